"""The encoder's layers in one kernel call (encoder_layers.c) for a short input: the C structs that
describe a model's layers, the checks, the call.

NomicMoEModel.forward offers its layers to the kernel (``SmallGemm.run_layers``) before running
them itself. The call takes them where every step is one the kernel runs anyway from the model's
modules (the few-row products, int8 with per-token activations, RoPE + attention, the MoE dispatch
and combine), with no hook on a module to honour; it then does in C what the modules do in Python
between those calls (residual add + LayerNorm, the router, the float MLPs' GELU). Otherwise it
returns None and the model's own loop runs, with the same results to float rounding (the tests hold
the two together).

The structs point into the modules' packed copies and parameters. Each call first checks that
everything they were made from is unchanged (``_Reads``: every attribute read, every parameter's
address and version); where something changed, the parts are gathered again (the modules' own
caches rebuild a copy after its weight changed) and the structs made anew.
"""

import ctypes
import weakref
from typing import Optional, Tuple

import torch

_PTR, _I64 = ctypes.c_void_p, ctypes.c_int64


class _Mats(ctypes.Structure):
    """nm_mats: one matrix, or an MoE layer's experts, in the kernel's layout."""
    _fields_ = [("panels", _PTR), ("colsums", _PTR), ("scales", _PTR), ("bias", _PTR), ("n", _I64), ("k", _I64)]


class _Layer(ctypes.Structure):
    """nm_layer: one encoder layer (a dense one has experts = 0, its MLP in up and down)."""
    _fields_ = [("qkv", _Mats), ("out", _Mats), ("norm1_w", _PTR), ("norm1_b", _PTR), ("norm2_w", _PTR),
                ("norm2_b", _PTR), ("eps", ctypes.c_float), ("heads", _I64), ("head_dim", _I64), ("experts", _I64),
                ("up", _Mats), ("down", _Mats), ("router", _PTR), ("top_k", _I64), ("norm_topk", ctypes.c_int),
                ("expert_bias", _PTR)]


class _Plan:
    """One model's layers as the call takes them: the structs (None where the call does not take the
    model), what they point into (kept alive here), and what they were made from (``reads``)."""

    def __init__(self, dtype, reads, modules, layers=None, keep=(), moe_layers=0, experts=0):
        self.dtype, self.reads, self.modules = dtype, reads, modules  # modules: whose hooks to honour
        self.layers, self.keep, self.moe_layers, self.experts = layers, keep, moe_layers, experts

    def hooked(self) -> bool:
        """A hook on a module inside the layers (a server's routing counter, a user's probe) must see
        its calls: then the model's loop runs."""
        return any(m._forward_hooks or m._forward_pre_hooks for m in self.modules) or bool(
            torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks)


_MISSING = object()


class _Reads:
    """What a plan was made from: every attribute the gathering read (where it was found, and what
    it held), each tensor's address and version, and a few computed values. The plan is reused while
    all are unchanged: a module or parameter replaced, a weight updated in place or moved, a kernel
    or implementation switched, and the parts are gathered again."""

    def __init__(self):
        self.attrs, self.tensors, self.calls = [], [], []

    def __call__(self, obj, name):
        """obj.name as nn.Module finds it (instance dict, then parameters, modules, buffers), or None."""
        d = obj.__dict__
        for store in (d, d.get("_parameters"), d.get("_modules"), d.get("_buffers")):
            if store is not None and name in store:
                value = store[name]
                self.attrs.append((store, name, value))
                if isinstance(value, torch.Tensor):
                    self.tensors.append((value, value.data_ptr(), _version(value)))
                return value
        self.attrs.append((d, name, _MISSING))  # absent: set later, it changes the plan
        return None

    def children(self, container):
        """The modules of a ModuleList, in order (each one read, and their number)."""
        store = container.__dict__["_modules"]
        self.call(lambda: len(store))
        return [self(container, name) for name in list(store)]

    def call(self, fn):
        value = fn()
        self.calls.append((fn, value))
        return value

    def unchanged(self) -> bool:
        return all(store.get(name, _MISSING) is value for store, name, value in self.attrs) \
            and all(t.data_ptr() == ptr and _version(t) == v for t, ptr, v in self.tensors) \
            and all(fn() == value for fn, value in self.calls)


def _version(t: torch.Tensor) -> int:
    return 0 if t.is_inference() else t._version  # an inference tensor has no counter, and cannot change


class LayerRunner:
    """encoder_layers.c's nm_encoder_layers for one loaded kernel (``kernel``: its SmallGemm)."""

    def __init__(self, lib, kernel):
        self.kernel = kernel
        self._run = lib.nm_encoder_layers
        self._run.argtypes = [ctypes.POINTER(_Layer), _I64, _PTR, ctypes.c_int, _I64, _I64, _I64, _PTR, _PTR, _PTR, _PTR,
                              ctypes.c_int]
        self._run.restype = ctypes.c_int
        self._plans = weakref.WeakKeyDictionary()  # model -> _Plan
        self._router_f32 = {}  # id of a bf16 router's weight -> (weakref to it, its version, its fp32 copy)

    def run(self, model, x: torch.Tensor, packing, hooks: bool = True) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """x [N, H] (the embeddings, as embed_packed gives them) through every layer of ``model``:
        (x after the last layer, [MoE layers, E] (token, slot) pairs each expert received), or None
        where this call does not take these inputs or this model (the model's loop then runs).
        hooks=False: the caller's own hooks on the layers need not see this call (a server whose
        routing counter takes the returned counts instead)."""
        dtype = x.dtype
        if packing.graph or x.dim() != 2 or x.shape[0] == 0 or x.device.type != "cpu" or not self.kernel.accepts(x.shape[0], dtype) \
                or dtype not in (torch.float32, torch.bfloat16) or (dtype == torch.bfloat16 and not self.kernel.bf16) \
                or torch.is_grad_enabled() or torch.jit.is_tracing() \
                or getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)():
            return None
        plan = self._plan(model, dtype)
        if plan is None or (hooks and plan.hooked()):
            return None
        x = x.contiguous().clone()  # worked on in place
        N, H = x.shape
        bounds = torch.tensor(packing.text_bounds(), dtype=torch.int64)
        layer0 = model.encoder.layers[0].attn
        cos, sin = (t.reshape(N, layer0.head_dim).contiguous() for t in packing.rope(layer0.head_dim, layer0.rope_theta,
                                                                                     torch.float32))
        counts = torch.zeros(plan.moe_layers, plan.experts, dtype=torch.int64)
        status = self._run(plan.layers, len(plan.layers), x.data_ptr(), dtype == torch.bfloat16, N, H, len(bounds) - 1,
                           bounds.data_ptr(), cos.data_ptr(), sin.data_ptr(), counts.data_ptr(), torch.get_num_threads())
        if status == -2:
            raise MemoryError(f"the encoder-layers kernel could not allocate its buffers for {N} tokens")
        if status != 0:
            raise RuntimeError(f"the encoder-layers kernel refused this model's layers (status {status})")
        return x, counts

    # --- the plan: what each layer's struct points into ---

    def _plan(self, model, dtype) -> Optional[_Plan]:
        plan = self._plans.get(model)
        if plan is not None and plan.dtype == dtype and plan.reads.unchanged():
            # tens of microseconds, against 0.4 ms to gather the parts again at the real size; a model
            # the call does not take (layers None) is refused as fast, while what decided it stands
            return plan if plan.layers is not None else None
        reads = _Reads()
        parts = self._gather(model, dtype, reads)
        modules = tuple(m for layer in model.encoder.layers for m in layer.modules())
        # something changed (rare: a weight updated, a module swapped): the structs are made anew
        plan = _Plan(dtype, reads, modules) if parts is None else self._build(parts, model, dtype, reads, modules)
        self._plans[model] = plan
        return plan if plan.layers is not None else None

    def _gather(self, model, dtype, r):
        """Each layer's packed matrices and float parameters, in _build's order, or None where a
        layer has a step the kernel does not take. Every attribute it reads goes through ``r``."""
        config = model.config
        if r.call(lambda: getattr(config, "_attn_implementation", None)) not in (None, "sdpa") \
                or not self.kernel.accepts_attention(dtype, config.hidden_size // config.num_attention_heads):
            return None
        parts = []
        for layer in r.children(r(r(model, "encoder"), "layers")):
            attn, mlp = r(layer, "attn"), r(layer, "mlp")
            got = [self._matrix(r(attn, "Wqkv"), dtype, r), self._matrix(r(attn, "out_proj"), dtype, r)]
            r(attn, "num_heads"), r(attn, "head_dim")
            if r(layer, "is_moe"):
                ex, router = r(mlp, "experts"), r(r(mlp, "router"), "layer")
                r(r(mlp, "router"), "top_k"), r(r(mlp, "router"), "normalize")
                if r(ex, "implementation") != "auto" or router.out_features > 64:
                    return None
                got += [*self._experts(ex, dtype, r), self._router(r(router, "weight")), self._param(r(ex, "bias"), dtype)]
            else:
                got += [self._matrix(r(mlp, "fc1"), dtype, r), self._matrix(r(mlp, "fc2"), dtype, r)]
            norms = r(layer, "norm1"), r(layer, "norm2")
            got += [self._param(r(n, "weight"), dtype) for n in norms] + [self._param(r(n, "bias"), dtype) for n in norms]
            r(norms[0], "eps")
            if any(p is None for p in got):
                return None
            parts.append(got)
        return parts

    def _matrix(self, m, dtype, r):
        """An attention or dense-MLP matrix as the kernel runs it: (pack, bias) or None."""
        if r(m, "cpu_kernel") is not self.kernel or not hasattr(m, "kernel_pack"):
            return None
        if r(m, "activations") is not None:  # Int8Linear
            if m.activations != "per_token" or dtype != torch.float32 or not self.kernel.int8:
                return None
            return (m.kernel_pack(), self._param(r(m, "_bias"), torch.float32, optional=True))
        if not r(m, "pack_cpu") or r(m, "weight").dtype != dtype:
            return None
        return (m.kernel_pack(), self._param(r(m, "bias"), dtype, optional=True))

    def _experts(self, ex, dtype, r):
        """An MoE layer's (ups, downs) groups, or (None, None)."""
        i8 = r(ex, "int8")
        if i8 is not None:
            if dtype != torch.float32 or not self.kernel.int8 or not all(
                    r(m, "cpu_kernel") is self.kernel and r(m, "activations") == "per_token"
                    for m in (*r.children(r(i8, "ups")), *r.children(r(i8, "downs")))):
                return None, None
            return i8.kernel_groups(self.kernel)
        mlp = r(ex, "mlp")
        r(mlp, "w2")
        if r(ex, "cpu_kernel") is not self.kernel or not r(ex, "pack_cpu") or r(mlp, "w1").dtype != dtype \
                or not hasattr(ex, "kernel_groups"):
            return None, None
        return ex.kernel_groups(self.kernel)

    def _router(self, w: torch.Tensor):
        """The router's weight in fp32 (the router computes in fp32), a bf16 one's copy made once."""
        if w.dtype == torch.float32:
            return w if w.is_contiguous() else None
        version = _version(w)
        kept = self._router_f32.get(id(w))
        if kept is None or kept[0]() is not w or kept[1] != version:
            for key in [k for k, v in self._router_f32.items() if v[0]() is None]:
                del self._router_f32[key]  # the copies of weights that are gone
            kept = (weakref.ref(w), version, w.detach().float().contiguous())
            self._router_f32[id(w)] = kept
        return kept[2]

    @staticmethod
    def _param(p, dtype, optional=False):
        """A float parameter the C code reads as it is: contiguous, in ``dtype``."""
        if p is None:
            return False if optional else None  # False: no bias (a part, not a refusal)
        return p if p.dtype == dtype and p.is_contiguous() else None

    def _build(self, parts, model, dtype, reads, modules) -> _Plan:
        keep, structs = [], []
        config = model.config

        def mats(part):
            """(pack, bias) of one matrix, or an MoE layer's group (its list) of expert matrices."""
            bias = None
            if isinstance(part, tuple):
                (pack, bias), part = part, [part[0]]
            group = part if hasattr(part, "arrays") else self.kernel.group(part)
            keep.append(group)
            arrays = group.arrays
            b = bias.data_ptr() if isinstance(bias, torch.Tensor) else None
            return _Mats(ctypes.cast(arrays[0], _PTR), ctypes.cast(arrays[1], _PTR) if len(arrays) > 1 else None,
                         ctypes.cast(arrays[2], _PTR) if len(arrays) > 2 else None, b, group.n, group.k)

        moe_layers = 0
        for layer, got in zip(model.encoder.layers, parts):
            s = _Layer()
            s.qkv, s.out = mats(got[0]), mats(got[1])
            n1w, n2w, n1b, n2b = got[-4:]
            s.norm1_w, s.norm2_w, s.norm1_b, s.norm2_b = (t.data_ptr() for t in (n1w, n2w, n1b, n2b))
            s.eps = layer.norm1.eps
            s.heads, s.head_dim = layer.attn.num_heads, layer.attn.head_dim
            if layer.is_moe:
                ups, downs, router, bias = got[2:6]
                s.experts, s.up, s.down = len(ups), mats(ups), mats(downs)
                s.router, s.top_k = router.data_ptr(), layer.mlp.router.top_k
                s.norm_topk, s.expert_bias = int(bool(layer.mlp.router.normalize)), bias.data_ptr()
                moe_layers += 1
            else:
                s.experts, s.up, s.down = 0, mats(got[2]), mats(got[3])
            structs.append(s)
        layers = (_Layer * len(structs))(*structs)
        return _Plan(dtype, reads, modules, layers, (keep, parts), moe_layers, config.num_experts)
