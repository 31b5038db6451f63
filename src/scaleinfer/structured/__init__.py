"""Structured outputs: grammar compilation (xgrammar) and the per-request token bitmasks the sampler applies.

    StructuredOutputsParams (sampling_params.py)
      -> GrammarCompiler.compile()        CompiledGrammar, once per distinct spec (cached)
      -> GrammarState (one per request)   an xgrammar GrammarMatcher
      -> fill_bitmask(requests)           [B, ceil(V / 32)] int32, one row per sampled request
      -> Sampler: apply_bitmask           disallowed logits -> -inf
      -> advance(requests, tokens)        each matcher accepts its sampled token
"""
