"""GPU check: scaleinfer on CUDA vs HF transformers on the same (random-weight, SmolLM2-shaped)
model: logits parity, greedy agreement, batch-1 decode and batched throughput. Prints a table and
writes JSON. Random weights because the machine with the GPU cannot fetch the real ones; the
speed of a model does not depend on its weight values.

    python benchmarks/gpu_check.py --tokenizer-dir DIR --out results.json [--shape qwen2.5-1.5b]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch


def make_model_dir(tokenizer_dir: str, path: str, shape: str):
    import shutil

    import transformers

    if shape == "smollm2-135m":
        cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                       num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                       max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                                       tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
        cls = transformers.LlamaForCausalLM
    else:   # Qwen2.5-1.5B's shape (QKV bias, 2 KV heads, a 151,936-token vocabulary)
        cfg = transformers.Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                                       num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                                       max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                                       tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
        cls = transformers.Qwen2ForCausalLM
    torch.manual_seed(0)
    model = cls(cfg).eval()
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{tokenizer_dir}/{name}", f"{path}/{name}")
    return model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokenizer-dir", required=True)
    p.add_argument("--out", default="gpu_check.json")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--shape", default="smollm2-135m", choices=["smollm2-135m", "qwen2.5-1.5b"])
    args = p.parse_args()
    from scaleinfer import LLM, SamplingParams

    dtype = getattr(torch, args.dtype)
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "dtype": args.dtype,
              "shape": args.shape}
    with tempfile.TemporaryDirectory() as path:
        hf = make_model_dir(args.tokenizer_dir, path, args.shape).to("cuda")
        ids = list(range(1000, 1500))
        with torch.inference_mode():
            ref32 = hf(torch.tensor([ids], device="cuda")).logits[0].float()
            hf = hf.to(dtype)
            ref = hf(torch.tensor([ids], device="cuda")).logits[0].float()
        llm = LLM(path, device="cuda", dtype=args.dtype, kv_cache_memory="4GiB", max_num_seqs=256,
                  max_num_batched_tokens=4096)
        ours = llm.engine.compute_logits(ids)
        result["logits_max_abs_diff"] = (ours - ref).abs().max().item()
        result["logits_ref_max_abs"] = ref.abs().max().item()
        # how far each side's rounding takes it from the fp32 reference (0 for fp32 HF itself)
        result["hf_vs_fp32_hf_max_abs_diff"] = (ref - ref32).abs().max().item()
        result["ours_vs_fp32_hf_max_abs_diff"] = (ours - ref32).abs().max().item()
        prompt = ids[:32]
        out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=32, min_tokens=32))[0]
        with torch.inference_mode():
            ref_ids = hf.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=32, min_new_tokens=32,
                                  do_sample=False)[0, 32:].tolist()
        result["greedy_32_match_prefix"] = next((i for i, (a, b) in enumerate(zip(out.outputs[0].token_ids, ref_ids))
                                                 if a != b), 32)

        def timed(fn):
            torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            return time.perf_counter() - t

        params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
        llm.generate([prompt], params)
        t = timed(lambda: llm.generate([prompt], params))
        result["scaleinfer_decode_b1_tok_s"] = 128 / t
        with torch.inference_mode():
            x = torch.tensor([prompt], device="cuda")
            hf.generate(x, max_new_tokens=8, min_new_tokens=8, do_sample=False)
            t = timed(lambda: hf.generate(x, max_new_tokens=128, min_new_tokens=128, do_sample=False))
        result["hf_decode_b1_tok_s"] = 128 / t
        batch = [list(range(2000 + i, 2000 + i + 256)) for i in range(64)]
        t = timed(lambda: llm.generate(batch, params))
        result["scaleinfer_batch64_tok_s"] = 64 * 128 / t
        with torch.inference_mode():
            x = torch.tensor(batch, device="cuda")
            t = timed(lambda: hf.generate(x, max_new_tokens=128, min_new_tokens=128, do_sample=False))
        result["hf_batch64_tok_s"] = 64 * 128 / t
    for k, v in result.items():
        print(f"{k:32} {v}")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
