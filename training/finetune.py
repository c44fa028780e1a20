"""`nomic-moe finetune MODEL TRAIN OUT`: the paper's fine-tuning recipe (SPEC §5) on sentence-transformers.

    contrastive  InfoNCE with in-batch negatives at temperature 0.02 (MultipleNegativesRankingLoss,
                 scale 50; its cached/GradCache variant with --cached-batch for large batches),
                 with mined or given hard negatives, inside MatryoshkaLoss for the --matryoshka dims
    prompts      "search_query: " on the query column, "search_document: " on positives and
                 negatives, as the model was trained (the trainer's `prompts` argument)
    MoE          + coef * the load-balancing loss of every MoE layer (default 0, as SPEC §5 says for
                 fine-tuning); the log shows the expert load per layer; a differentiable expert
                 backend runs (never the forward-only Triton kernels)
    evaluation   InformationRetrievalEvaluator on EVAL (or a held-out slice of TRAIN) before and
                 after: recall@1/10, MRR@10, nDCG@10 at each Matryoshka dim

OUT is a model folder in our layout (written and verified like `convert` output, then put in place
atomically), which `nomic-moe release` accepts. Trainer checkpoints live in OUT.training/ until the
run ends, so that an interrupted run continues with --resume.
"""

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from nomic_moe_files import checks
from nomic_moe_files.errors import UserError
from nomic_moe_files.hub import resolve_source
from nomic_moe_files.publish import check_out_dir

from . import data
from .moe import MoEAuxLoss, RouterStats, format_load, load_spread, measure_load

TEMPERATURE = 0.02  # SPEC §5: logit scale 50
FINETUNE_AUX_COEF = 0.0  # SPEC §5: weight 1 in contrastive pretraining, 0 in fine-tuning


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def evaluate(model, task, dims, name: str) -> dict:
    """recall@1/10, MRR@10, nDCG@10 per Matryoshka dim on a retrieval task (queries, corpus, relevant)."""
    from sentence_transformers.evaluation import InformationRetrievalEvaluator

    queries, corpus, relevant = task
    out = {}
    for dim in dims:
        ev = InformationRetrievalEvaluator(queries, corpus, relevant, name=f"{name}_{dim}", truncate_dim=dim,
                                           query_prompt_name="query", corpus_prompt_name="document", accuracy_at_k=[1, 10],
                                           precision_recall_at_k=[1, 10], mrr_at_k=[10], ndcg_at_k=[10], map_at_k=[10],
                                           show_progress_bar=False, write_csv=False)
        scores = ev(model)

        def get(metric):
            return next(v for k, v in scores.items() if k.endswith(f"cosine_{metric}"))

        out[dim] = {"recall@1": get("recall@1"), "recall@10": get("recall@10"), "mrr@10": get("mrr@10"), "ndcg@10": get("ndcg@10")}
    return out


def print_metrics(title: str, metrics: dict, n_queries: int, n_docs: int) -> None:
    log(f"{title} ({n_queries} queries, {n_docs} documents):")
    for dim, m in metrics.items():
        log(f"  dim {dim:>4}: recall@1 {m['recall@1']:.3f}  recall@10 {m['recall@10']:.3f}  MRR@10 {m['mrr@10']:.3f}  nDCG@10 {m['ndcg@10']:.3f}")


def _trainer_class():
    from sentence_transformers import SentenceTransformerTrainer

    class MoETrainer(SentenceTransformerTrainer):
        """Adds the MoE numbers (aux loss, expert load, tokens/s) to every log line."""

        moe_stats = None

        def log(self, logs, *args, **kwargs):
            if self.moe_stats is not None and "loss" in logs:
                extra = self.moe_stats.flush()
                load = extra.pop("expert_load")
                logs.update({k: round(v, 4) for k, v in extra.items() if v is not None})
                log(f"step {self.state.global_step}/{self.state.max_steps}: loss {logs['loss']:.4f}"
                    + (f", aux {extra['aux_loss']:.4f}" if extra["aux_loss"] is not None else "")
                    + f", {extra['tokens_per_second']:,.0f} tok/s; expert load % {format_load(load)}")
            super().log(logs, *args, **kwargs)

    return MoETrainer


def _checkpoint(workdir: Path) -> Optional[Path]:
    """The newest whole checkpoint. The trainer writes trainer_state.json after the weights and the
    optimizer, so a checkpoint without it was cut off mid-save (Ctrl-C) and is passed over."""
    def step(p):
        tail = p.name.split("-")[-1]
        return int(tail) if tail.isdigit() else -1

    for ckpt in sorted(workdir.glob("checkpoint-*"), key=step, reverse=True):
        if (ckpt / "trainer_state.json").exists() and (ckpt / "config.json").exists():
            return ckpt
        log(f"passing over {ckpt.name}: incomplete (interrupted while it was being saved)")
    return None


def finetune(model: str, train: str, out: str, *, eval_file: Optional[str] = None, epochs: float = 1.0, batch_size: int = 32,
             lr: float = 2e-5, matryoshka: Optional[str] = None, hard_negatives: int = 0, aux_loss_coef: float = FINETUNE_AUX_COEF,
             bf16: bool = False, max_steps: Optional[int] = None, resume: bool = False, cached_batch: Optional[int] = None,
             hard_negative_margin: float = 0.05,
             gradient_checkpointing: bool = False, save_steps: int = 500, logging_steps: int = 10, seed: int = 0,
             device: Optional[str] = None, force: bool = False) -> dict:
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainingArguments, losses
    from sentence_transformers.training_args import BatchSamplers

    from nomic_moe_conversion.convert import load_checked, write_verified

    t0 = time.time()
    # -- every check before any training -------------------------------------------------------
    model_dir = resolve_source(model)
    cfg = checks.model_folder(model_dir)
    out_dir = check_out_dir(out, force)
    workdir = out_dir.with_name(out_dir.name + ".training")
    if workdir.exists() and not resume:
        if any(workdir.glob("checkpoint-*")):
            raise UserError(f"{workdir} holds an earlier run's checkpoints", "pass --resume to continue it, or delete the folder")
        shutil.rmtree(workdir)  # an earlier run that stopped before its first checkpoint: nothing to continue
    if resume and not (workdir.exists() and _checkpoint(workdir)):
        raise UserError(f"--resume: no checkpoint in {workdir}", "start without --resume")
    if batch_size < 2:
        raise UserError(f"--batch-size {batch_size}: in-batch negatives need at least 2", "use 32 or more (the paper: 256)")
    if cached_batch and aux_loss_coef:
        raise UserError("--cached-batch recomputes the forward passes during backward, where the load-balancing loss cannot join",
                        "use --aux-loss-coef 0 (the fine-tuning default) with --cached-batch")
    if bf16 and not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()) and device != "cpu":
        log("note: --bf16 on the CPU uses autocast there (slow on CPUs without AVX512-BF16/AMX)")
    train_pairs = data.load_pairs(train, "TRAIN")
    if eval_file:
        eval_pairs = data.load_pairs(eval_file, "EVAL")
    else:
        train_pairs, eval_pairs = data.split_held_out(train_pairs, seed=seed)
        log(f"no --eval: holding out {len(eval_pairs)} of the TRAIN rows for evaluation")
    hidden = cfg.get("hidden_size", cfg.get("n_embd"))
    dims = data.matryoshka_dims(matryoshka, hidden)

    # -- model, data, loss ---------------------------------------------------------------------
    st = SentenceTransformer(str(model_dir), trust_remote_code=True, device=device)
    auto_model = st[0].auto_model
    auto_model.set_moe_implementation("auto")  # with gradients, auto never picks the forward-only kernels
    if gradient_checkpointing:
        auto_model.gradient_checkpointing_enable()
    prompts = st.prompts
    if "query" not in prompts or "document" not in prompts:
        raise UserError(f"{model_dir} defines no query/document prompts", "fine-tune a model folder written by nomic-moe convert")
    q_docs = data.retrieval_task(eval_pairs)
    load_texts = [prompts["query"] + q for q in q_docs[0].values()] + [prompts["document"] + d for d in q_docs[1].values()]
    before = evaluate(st, q_docs, dims, "before")
    load_before = measure_load(st, load_texts)
    print_metrics("before fine-tuning", before, len(q_docs[0]), len(q_docs[1]))
    log(f"  expert load % on the evaluation texts: {format_load(load_before)} (spread {load_spread(load_before):.3f})")

    train_ds = data.to_dataset(train_pairs)
    if hard_negatives:
        from sentence_transformers.util import mine_hard_negatives

        if "negative_1" in train_ds.column_names:
            train_ds = train_ds.select_columns(["query", "positive"])
            log("--hard-negatives: the negatives given in TRAIN are replaced by mined ones")
        log(f"mining {hard_negatives} hard negatives per query with the model itself")
        train_ds = mine_hard_negatives(train_ds, st, anchor_column_name="query", positive_column_name="positive",
                                       num_negatives=hard_negatives, range_min=0, range_max=max(4 * hard_negatives, 30),
                                       # a candidate scoring within the margin of the positive is likely a false negative
                                       relative_margin=hard_negative_margin or None, sampling_strategy="top",
                                       query_prompt_name="query", corpus_prompt_name="document", output_format="n-tuple",
                                       batch_size=batch_size, verbose=False)
        if len(train_ds) == 0:
            raise UserError("no query kept a full set of hard negatives", "use fewer --hard-negatives, or more documents")
    column_prompts = {c: prompts["query"] if c == "query" else prompts["document"] for c in train_ds.column_names}

    scale = 1.0 / TEMPERATURE
    if cached_batch:
        contrastive = losses.CachedMultipleNegativesRankingLoss(st, scale=scale, mini_batch_size=cached_batch)
    else:
        contrastive = losses.MultipleNegativesRankingLoss(st, scale=scale)
    inner = losses.MatryoshkaLoss(st, contrastive, matryoshka_dims=dims) if len(dims) > 1 or dims[0] != hidden else contrastive
    stats = RouterStats(auto_model)
    loss = MoEAuxLoss(st, inner, aux_loss_coef, stats)

    args = SentenceTransformerTrainingArguments(
        output_dir=str(workdir), num_train_epochs=epochs, max_steps=max_steps or -1, per_device_train_batch_size=batch_size,
        learning_rate=lr, warmup_ratio=0.1, bf16=bf16, use_cpu=device == "cpu" or not torch.cuda.is_available(), logging_steps=logging_steps,
        save_strategy="steps", save_steps=save_steps, save_total_limit=2, eval_strategy="no", report_to="none", seed=seed,
        batch_sampler=BatchSamplers.NO_DUPLICATES, prompts=column_prompts, dataloader_drop_last=len(train_ds) >= 2 * batch_size,
        disable_tqdm=False,
    )
    trainer = _trainer_class()(model=st, args=args, train_dataset=train_ds, loss=loss)
    trainer.moe_stats = stats
    checkpoint = _checkpoint(workdir) if resume else None
    log(f"training: {len(train_ds)} pairs, batch {batch_size}, lr {lr}, temperature {TEMPERATURE}, matryoshka {dims}, "
        f"aux loss coef {aux_loss_coef}, {'bf16' if bf16 else 'fp32'}" + (f"; resuming from {checkpoint.name}" if checkpoint else ""))
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    stats.remove(auto_model)
    if result.global_step == 0:
        raise UserError("training ran no step: no batch could be formed without repeating a text (in-batch negatives "
                        "must be negatives), or the data is smaller than one batch", "lower --batch-size, or add more distinct texts")

    after = evaluate(st, q_docs, dims, "after")
    load_after = measure_load(st, load_texts)
    print_metrics("after fine-tuning", after, len(q_docs[0]), len(q_docs[1]))
    log(f"  expert load % on the evaluation texts: {format_load(load_after)} (spread {load_spread(load_after):.3f})")

    # -- OUT: our layout, verified, in place atomically ----------------------------------------
    _, kw, _ = load_checked(model_dir)
    weights = {k: v.detach().float().cpu().contiguous() for k, v in auto_model.state_dict().items()}
    write_verified(out_dir, kw, weights, weights, model_dir, force=force)
    report = {
        "model": str(model), "train": str(train), "eval": str(eval_file) if eval_file else "held out from TRAIN",
        "pairs": len(train_ds), "eval_queries": len(q_docs[0]), "eval_documents": len(q_docs[1]),
        "args": {"epochs": epochs, "batch_size": batch_size, "lr": lr, "temperature": TEMPERATURE, "matryoshka": dims,
                 "hard_negatives": hard_negatives, "aux_loss_coef": aux_loss_coef, "bf16": bf16, "max_steps": max_steps,
                 "cached_batch": cached_batch},
        "steps": result.global_step, "train_loss": result.training_loss, "seconds": round(time.time() - t0, 1),
        "before": {str(d): m for d, m in before.items()}, "after": {str(d): m for d, m in after.items()},
        "expert_load": {"before": {str(k): v for k, v in load_before.items()}, "after": {str(k): v for k, v in load_after.items()}},
        "load_spread": {"before": load_spread(load_before), "after": load_spread(load_after)},
    }
    (out_dir / "training_report.json").write_text(json.dumps(report, indent=2))
    shutil.rmtree(workdir, ignore_errors=True)  # the run is whole: its checkpoints are no longer needed
    log(f"done in {report['seconds']}s: {out_dir} (loads with AutoModel and sentence-transformers; nomic-moe release accepts it)")
    return report
