"""`scaleinfer distill`: train a student (a pruned checkpoint, or any smaller model with the teacher's
tokenizer) on a teacher's logits, on the CPU or a CUDA GPU, resumable; the output is an HF directory `--model`
loads.

Loss per token (Hinton et al.; MiniLLM / DistillSpec use the same ingredients):
    alpha * T^2 * KL(p_teacher^T || q_student^T) over the teacher's top-k tokens  +  (1 - alpha) * CE(next token)
where p^T is the teacher's softmax at temperature T renormalized over its top-k logits and q^T the
student's full-vocabulary softmax at T gathered at those k tokens. Top-k keeps the teacher cache small
(k x 8 bytes per token) and drops the noisy tail. AdamW, linear warm-up then cosine decay, gradient
clipping, optional bf16 autocast. Every `save_every` steps (and at the end) the output directory holds
the student (float32 safetensors) and trainer_state.pt (optimizer, step, RNG state, loss history), so
`--resume` continues with the state an uninterrupted run would have had (same batches, same losses).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from scaleinfer.compress.checkpoints import Source, build_hf_model, open_source, prepare_output, state_of, write_hf_dir
from scaleinfer.compress.distill_data import TeacherCache, batch_indices, read_texts, split_windows
from scaleinfer.errors import ConfigError

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
LOG_FILE = "distill_log.jsonl"


@dataclass(frozen=True)
class DistillConfig:
    steps: int
    seq_len: int = 256
    batch_size: int = 4
    lr: float = 1e-4
    warmup: int = 10
    """Steps of linear warm-up before the cosine decay (to lr / 10 at the last step)."""
    weight_decay: float = 0.01
    temperature: float = 2.0
    top_k: int = 64
    alpha: float = 0.9
    """Weight of the distillation term; 1 - alpha weighs the next-token cross-entropy."""
    clip: float = 1.0
    holdout: float = 0.1
    seed: int = 0
    save_every: int = 50
    bf16: bool = False
    freeze_embeddings: bool = False
    """Train the decoder layers and final norm only: the token embedding and LM head stay as they are (for a
    large-vocabulary student such as Qwen2.5-0.5B's 151,936 x 896 that is a quarter of its parameters, their
    gradients and AdamW moments)."""
    device: str = "cpu"
    """Where the teacher and student run: cpu, cuda or cuda:N. Not part of a run's identity: a run saved on
    one device resumes on another."""

    def check(self) -> None:
        rules = [(self.steps >= 1, "--steps must be >= 1"), (self.seq_len >= 8, "--seq-len must be >= 8"),
                 (self.batch_size >= 1, "--batch-size must be >= 1"), (self.lr > 0, "--lr must be > 0"),
                 (self.temperature > 0, "--temperature must be > 0"), (self.top_k >= 1, "--top-k must be >= 1"),
                 (0 <= self.alpha <= 1, "--alpha must be in [0, 1]"), (self.clip > 0, "--clip must be > 0"),
                 (self.save_every >= 1, "--save-every must be >= 1"), (self.warmup >= 0, "--warmup must be >= 0")]
        for ok, message in rules:
            if not ok:
                raise ConfigError(message)
        self.torch_device()

    def torch_device(self) -> torch.device:
        """The run's torch device; a one-line error for a bad name or a GPU that is not there."""
        try:
            dev = torch.device(self.device)
        except RuntimeError:
            raise ConfigError(f"--device {self.device!r}: give cpu, cuda or cuda:N") from None
        if dev.type not in ("cpu", "cuda"):
            raise ConfigError(f"--device {self.device!r}: give cpu, cuda or cuda:N")
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError(f"--device {self.device}: no CUDA GPU is visible to torch here; use --device cpu")
            if (dev.index or 0) >= torch.cuda.device_count():
                raise ConfigError(f"--device {self.device}: this machine has {torch.cuda.device_count()} CUDA "
                                  f"GPU(s), numbered from 0")
        return dev

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / (self.warmup + 1)
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def distill_loss(student_logits: torch.Tensor, teacher_values: torch.Tensor, teacher_idx: torch.Tensor,
                 targets: torch.Tensor, temperature: float, alpha: float) -> tuple[torch.Tensor, dict]:
    """The loss of one batch: student logits [B, T, V], teacher top-k values / indices [B, T, k], targets
    [B, T-1] (the next tokens). Position t predicts token t+1; the last position has no target."""
    s = student_logits[:, :-1].float()
    tv, ti = teacher_values[:, :-1], teacher_idx[:, :-1]
    p = torch.softmax(tv / temperature, dim=-1)
    log_q = torch.log_softmax(s / temperature, dim=-1).gather(-1, ti)
    kl = (p * (torch.log(p.clamp_min(1e-30)) - log_q)).sum(-1).mean() * temperature ** 2
    ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), targets.reshape(-1))
    return alpha * kl + (1 - alpha) * ce, {"kl": kl.item(), "ce": ce.item()}


@torch.no_grad()
def held_out_perplexity(model, windows: list[list[int]], batch_size: int = 4, bf16: bool = False) -> float | None:
    """exp(mean next-token NLL) of `model` over `windows` (None when there are none), on the model's device."""
    if not windows:
        return None
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll, n = 0.0, 0
    for i in range(0, len(windows), batch_size):
        ids = torch.tensor(windows[i:i + batch_size], device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=ids, use_cache=False).logits
        nll += float(F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                     reduction="sum"))
        n += ids[:, 1:].numel()
    model.train(was_training)
    return math.exp(nll / n)


def _check_pair(teacher: Source, student: Source) -> None:
    tv, sv = teacher.config.vocab_size, student.config.vocab_size
    if tv != sv:
        raise ConfigError(f"teacher and student vocabularies differ ({tv} vs {sv} tokens); distillation on logits "
                          f"needs a student with the teacher's tokenizer")
    probe = "Distillation probe: the quick brown fox, 1234, 你好."
    if teacher.ckpt.tokenizer.encode(probe, add_special_tokens=False) != \
            student.ckpt.tokenizer.encode(probe, add_special_tokens=False):
        raise ConfigError("teacher and student tokenizers split text differently; use a student built from the "
                          "teacher (e.g. scaleinfer prune)")


def _save(output: str, student, source: Source, state: dict, meta: dict) -> None:
    weights = {k: v.cpu() for k, v in state_of(student).items()}
    write_hf_dir(output, source.hf_config, weights, source, "float32", extra={"distill": meta})
    tmp = os.path.join(output, STATE_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, os.path.join(output, STATE_FILE))


def _load_state(output: str, cfg: DistillConfig) -> dict:
    path = os.path.join(output, STATE_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"--resume: {output!r} has no {STATE_FILE}; start without --resume")
    state = torch.load(path, weights_only=False)
    saved = state["config"]
    differs = [k for k in ("seq_len", "batch_size", "top_k", "temperature", "alpha", "seed", "holdout",
                           "freeze_embeddings") if saved.get(k, False) != getattr(cfg, k)]
    if differs:
        raise ConfigError(f"--resume with different {', '.join('--' + k.replace('_', '-') for k in differs)} than "
                          f"the saved run ({', '.join(f'{k}={saved[k]}' for k in differs)}); pass the same values")
    return state


@torch.no_grad()
def _teacher_logits(model, ids: torch.Tensor, bf16: bool) -> torch.Tensor:
    """One window at a time, so a window's logits never depend on which others shared its batch (a resumed
    run recomputes the cache in a different grouping and must see the same numbers)."""
    device = next(model.parameters()).device
    out = []
    for row in ids.to(device):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out.append(model(input_ids=row[None], use_cache=False).logits[0].float())
    return torch.stack(out)


def _trainable(model, freeze_embeddings: bool) -> list[torch.nn.Parameter]:
    """The parameters the optimizer updates: all, or all but the token embedding and LM head."""
    if freeze_embeddings:
        frozen = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
        for p in model.parameters():
            if id(p) in frozen:
                p.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def _write_log(output: str, history: list[dict]) -> None:
    with open(os.path.join(output, LOG_FILE), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in history)


def distill_to_dir(teacher: str, student: str, texts: list[str], output: str, cfg: DistillConfig, *,
                   resume: bool = False, overwrite: bool = False, on_step=None) -> dict:
    """`scaleinfer distill`: train `student` on `teacher`'s logits over `texts` for cfg.steps steps into
    `output` (with `resume`: continue the run saved there). `on_step(record)` sees every step's losses."""
    cfg.check()
    saved = _load_state(output, cfg) if resume else None
    if not resume:
        prepare_output(output, overwrite)
    student_src = open_source(output if resume else student)
    teacher_src = open_source(teacher)
    _check_pair(teacher_src, student_src)
    split = split_windows(teacher_src.ckpt.tokenizer, read_texts(texts), cfg.seq_len, cfg.holdout)
    device = cfg.torch_device()
    teacher_model = build_hf_model(teacher_src.hf_config, teacher_src.state).to(device)
    teacher_src.state.clear()
    model = build_hf_model(student_src.hf_config, student_src.state).to(device).train()
    student_src.state.clear()
    params = _trainable(model, cfg.freeze_embeddings)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if saved is not None:
        opt.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["rng"])
        meta = saved["meta"]
    else:
        torch.manual_seed(cfg.seed)
        meta = {"teacher": teacher, "student": student, "texts": list(texts), "config": dataclasses.asdict(cfg),
                "trainable_params": sum(p.numel() for p in params), "train_tokens": sum(map(len, split.train)),
                "held_out_tokens": sum(map(len, split.held_out)),
                "held_out_ppl_teacher": held_out_perplexity(teacher_model, split.held_out, bf16=cfg.bf16),
                "held_out_ppl_start": held_out_perplexity(model, split.held_out, bf16=cfg.bf16), "seconds": 0.0}
    history = saved["history"] if saved is not None else []
    _write_log(output, history)
    cache = TeacherCache(lambda ids: _teacher_logits(teacher_model, ids, cfg.bf16), split.train, cfg.top_k)
    start = time.perf_counter()
    for step in range(len(history), cfg.steps):
        record = _train_step(model, params, opt, cache, split.train, step, cfg)
        history.append(record)
        with open(os.path.join(output, LOG_FILE), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            meta = {**meta, "steps_done": step + 1, "seconds": meta["seconds"] + time.perf_counter() - start}
            start = time.perf_counter()
            if step + 1 == cfg.steps:
                meta["held_out_ppl_end"] = held_out_perplexity(model, split.held_out, bf16=cfg.bf16)
            _save(output, model, student_src, {"config": dataclasses.asdict(cfg), "optimizer": opt.state_dict(),
                                               "rng": torch.get_rng_state(), "history": history, "meta": meta},
                  meta)
        if on_step is not None:   # after the checkpoint: a run stopped here resumes from this step
            on_step(record)
    return {**meta, "final_loss": history[-1]["loss"] if history else None}


def _train_step(model, params, opt, cache: TeacherCache, windows: list[list[int]], step: int,
                cfg: DistillConfig) -> dict:
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    idx = batch_indices(step, cfg.batch_size, len(windows), cfg.seed)
    values, indices = (t.to(device) for t in cache.get(idx))
    ids = torch.tensor([windows[i] for i in idx], device=device)
    lr = cfg.lr_at(step)
    for group in opt.param_groups:
        group["lr"] = lr
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        logits = model(input_ids=ids, use_cache=False).logits
    loss, parts = distill_loss(logits, values, indices, ids[:, 1:], cfg.temperature, cfg.alpha)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip))
    opt.step()
    return {"step": step + 1, "loss": loss.item(), **parts, "lr": lr, "grad_norm": grad_norm,
            "seconds": round(time.perf_counter() - t0, 3)}
