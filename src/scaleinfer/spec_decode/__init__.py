"""Speculative decoding: proposers (n-gram prompt lookup, a draft model), the rejection sampler that keeps
the target's distribution, and the controller that picks how many tokens to propose.

    engine.step: proposer.propose(running) -> request.spec_token_ids
              -> scheduler: 1 + k query tokens for such a request (its KV blocks for all of them)
              -> runner: k + 1 query rows in one forward (each a decode row, its own context length)
              -> rejection.verify -> accepted drafts + one token of the target's own
              -> scheduler.update: num_computed_tokens past the accepted run only; blocks past the end freed
"""
