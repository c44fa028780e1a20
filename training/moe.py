"""The MoE part of fine-tuning: the load-balancing loss added to the contrastive one, and expert load in the log.

sentence-transformers' losses see embeddings only, and sentence-transformers 6 calls the
transformer's forward method directly (so hooks on the whole model never fire). Forward hooks on
each MoE block see its routing instead: from it come the load-balancing loss of every MoE layer
(SPEC §5: E * sum_i f_i * P_i, the model's own load_balancing_loss, averaged over layers and
forward passes) and the fraction of (token, slot) pairs each expert received, counted per layer.
"""

import sys
import time
from typing import Dict, List, Optional

import torch
from torch import nn


class RouterStats:
    """Hooks the MoE blocks; holds this step's aux losses and the expert counts since the last log."""

    def __init__(self, auto_model):
        self.num_experts = auto_model.config.num_experts
        self.balance = sys.modules[type(auto_model).__module__].load_balancing_loss  # the model's own definition
        self.step_aux: List[torch.Tensor] = []
        self.counts: Dict[int, torch.Tensor] = {}  # MoE layer index -> [E] (token, slot) pairs
        self.tokens = 0
        self.since = time.time()
        self.aux_sum, self.aux_n = 0.0, 0
        self.base_sum, self.base_n = 0.0, 0
        layers = auto_model.encoder.layers
        self.moe_layers = [i for i, layer in enumerate(layers) if layer.is_moe]
        self.handles = [layers[i].mlp.register_forward_hook(self._hook(i)) for i in self.moe_layers]

    def _hook(self, layer: int):
        def hook(module, args, output):
            routing = output[1]
            if torch.is_grad_enabled():
                self.step_aux.append(self.balance([routing], self.num_experts))
            with torch.no_grad():
                c = torch.bincount(routing.experts.flatten(), minlength=self.num_experts).cpu()
                self.counts[layer] = self.counts.get(layer, 0) + c
                if layer == self.moe_layers[0]:
                    self.tokens += int(routing.experts.shape[0])

        return hook

    def take_step_aux(self) -> Optional[torch.Tensor]:
        aux, self.step_aux = self.step_aux, []
        return torch.stack(aux).mean() if aux else None

    def record(self, base: torch.Tensor, aux: Optional[torch.Tensor]) -> None:
        self.base_sum += float(base)
        self.base_n += 1
        if aux is not None:
            self.aux_sum += float(aux)
            self.aux_n += 1

    def load(self) -> Dict[int, List[float]]:
        """Per MoE layer, the fraction of (token, slot) pairs each expert received since the last flush."""
        return {layer: (c / c.sum().clamp(min=1)).tolist() for layer, c in sorted(self.counts.items())}

    def flush(self) -> dict:
        """Numbers for one log line, then a fresh window."""
        elapsed = max(time.time() - self.since, 1e-9)
        load = self.load()
        out = {
            "contrastive_loss": self.base_sum / self.base_n if self.base_n else None,
            "aux_loss": self.aux_sum / self.aux_n if self.aux_n else None,
            "tokens_per_second": self.tokens / elapsed,
            "load_spread": load_spread(load),
            "expert_load": load,
        }
        self.counts, self.tokens, self.since = {}, 0, time.time()
        self.aux_sum = self.aux_n = self.base_sum = self.base_n = 0
        return out

    def remove(self, auto_model=None) -> None:
        for h in self.handles:
            h.remove()


def load_spread(load: Dict[int, List[float]]) -> Optional[float]:
    """How unevenly the experts are used: the coefficient of variation of their shares, averaged over layers (0 = even)."""
    if not load:
        return None
    cvs = []
    for shares in load.values():
        t = torch.tensor(shares)
        cvs.append(float(t.std(unbiased=False) / t.mean().clamp(min=1e-9)))
    return sum(cvs) / len(cvs)


class MoEAuxLoss(nn.Module):
    """contrastive loss + coef * the load-balancing loss of this step's forward passes."""

    def __init__(self, model, loss: nn.Module, coef: float, stats: RouterStats):
        super().__init__()
        self.model = model
        self.loss = loss
        self.coef = coef
        self.stats = stats

    def forward(self, sentence_features, labels):
        self.stats.take_step_aux()  # drop anything from outside this step (e.g. evaluation)
        base = self.loss(sentence_features, labels)
        aux = self.stats.take_step_aux()
        self.stats.record(base.detach(), aux.detach() if aux is not None else None)
        return base + self.coef * aux if (aux is not None and self.coef) else base

    def get_config_dict(self):
        inner = getattr(self.loss, "get_config_dict", lambda: {})()
        return {"loss": type(self.loss).__name__, **inner, "router_aux_loss_coef": self.coef}

    @property
    def citation(self):
        return getattr(self.loss, "citation", None)


@torch.no_grad()
def measure_load(st_model, texts: List[str], batch_size: int = 64) -> Dict[int, List[float]]:
    """Expert shares per MoE layer over ``texts`` (with their prompts already applied), for before/after comparisons."""
    auto_model = st_model[0].auto_model
    stats = RouterStats(auto_model)
    try:
        for i in range(0, len(texts), batch_size):
            batch = st_model.tokenizer(texts[i : i + batch_size], padding=True, truncation=True,
                                       max_length=st_model.max_seq_length, return_tensors="pt").to(st_model.device)
            auto_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return stats.load()
    finally:
        stats.remove(auto_model)


def format_load(load: Dict[int, List[float]]) -> str:
    return " | ".join(f"L{layer}: " + " ".join(f"{100 * s:4.1f}" for s in shares) for layer, shares in load.items())
