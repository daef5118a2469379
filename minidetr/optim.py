"""DETR's optimiser: AdamW with two learning rates, dropped 10x every `lr_drop` epochs.

AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019), for a
parameter p with gradient g at step t (DETR: beta1 0.9, beta2 0.999, eps 1e-8, weight
decay 1e-4; lr 1e-4 for the transformer, 1e-5 for the backbone):

    p <- p * (1 - lr * weight_decay)             the decay, apart from the gradient's scale
    m <- beta1 * m + (1 - beta1) * g             first moment
    v <- beta2 * v + (1 - beta2) * g^2           second moment
    p <- p - lr * (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)

Why not torch.optim.AdamW itself: constructing any torch.optim optimiser imports torch's
compiler (torch._dynamo, with sympy) to wrap the optimiser's methods, ~70 MiB of the
training process (a tiny run peaks at 460-560 MiB) for a compiler this loop never calls. So
the class here keeps the parameter groups and the state, and the update is torch's own
function, torch.optim.adamw.adamw, the one torch.optim.AdamW.step runs, given the same
state and settings: the parameters come out bit for bit the same (tests/test_optim.py).
state_dict() is torch.optim.AdamW's format, so a checkpoint loads into either.
"""
import torch
from torch.optim.adamw import adamw


class AdamW:
    """AdamW over parameter groups, as torch.optim.AdamW([{"params": [...], "lr": ...}, ...]).

    The update runs as torch.optim.AdamW's does by default: a loop over the tensors on the
    CPU, the multi-tensor kernels on a GPU. (torch's fused kernel would save ~7 ms of a
    ~180 ms tiny CPU step, but it orders the floating-point operations differently, and the
    update would no longer be the one the official code's torch.optim.AdamW makes.)
    """

    def __init__(self, groups, lr, weight_decay, betas=(0.9, 0.999), eps=1e-8):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.param_groups = [{**defaults, **group, "params": list(group["params"])} for group in groups]
        self.state = {}   # parameter -> {"step": scalar on the CPU, "exp_avg": m, "exp_avg_sq": v}

    def zero_grad(self, set_to_none=True):
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    def _state(self, p):
        if p not in self.state:   # the step count on the CPU, as torch keeps it: no device sync
            self.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                             "exp_avg_sq": torch.zeros_like(p)}
        return self.state[p]

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            states = [self._state(p) for p in params]
            beta1, beta2 = group["betas"]
            adamw(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                  [s["exp_avg_sq"] for s in states], [], [s["step"] for s in states],
                  amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
                  weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)

    # ---- checkpoints: torch.optim's format (state by parameter index, groups in order) ----

    def state_dict(self):
        index, state, groups = 0, {}, []
        for group in self.param_groups:
            ids = list(range(index, index + len(group["params"])))
            state.update({i: self.state[p] for i, p in zip(ids, group["params"]) if p in self.state})
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
            index += len(ids)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, saved):
        if [len(g["params"]) for g in saved["param_groups"]] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("the saved optimiser state has parameter groups of sizes "
                             f"{[len(g['params']) for g in saved['param_groups']]}, this model "
                             f"{[len(g['params']) for g in self.param_groups]}")
        self.state = {}
        for group, saved_group in zip(self.param_groups, saved["param_groups"]):
            for key in ("lr", "betas", "eps", "weight_decay"):   # the saved lr: dropped or not
                group[key] = saved_group[key]
            for p, i in zip(group["params"], saved_group["params"]):
                if i in saved["state"]:
                    s = saved["state"][i]
                    self.state[p] = {"step": s["step"], "exp_avg": s["exp_avg"].to(dtype=p.dtype, device=p.device),
                                     "exp_avg_sq": s["exp_avg_sq"].to(dtype=p.dtype, device=p.device)}


class StepDrop:
    """lr x gamma every `step_size` epochs (torch.optim.lr_scheduler.StepLR's rule); step() at
    each epoch's end. DETR drops once, at lr_drop (200 of its 300 epochs, or 8 of 10 here)."""

    def __init__(self, optimizer, step_size, gamma=0.1):
        self.optimizer, self.step_size, self.gamma = optimizer, step_size, gamma
        self.last_epoch = 0

    def step(self):
        self.last_epoch += 1
        if self.last_epoch % self.step_size == 0:
            for group in self.optimizer.param_groups:
                group["lr"] = group["lr"] * self.gamma

    def state_dict(self):   # the keys StepLR's own state_dict has that matter here
        return {"step_size": self.step_size, "gamma": self.gamma, "last_epoch": self.last_epoch}

    def load_state_dict(self, saved):
        self.last_epoch = saved["last_epoch"]


# ---- DETR's optimiser for a model: two learning rates, step drop ----

def build_optimizer(model, cfg):
    """AdamW with the backbone at lr_backbone and everything else at lr; x0.1 every lr_drop epochs."""
    backbone = [p for n, p in model.named_parameters() if n.startswith("backbone.") and p.requires_grad]
    rest = [p for n, p in model.named_parameters() if not n.startswith("backbone.") and p.requires_grad]
    groups = [{"params": rest, "lr": cfg.lr}]
    if backbone:
        groups.append({"params": backbone, "lr": cfg.lr_backbone})
    optimizer = AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)   # torch's update, as above
    return optimizer, StepDrop(optimizer, cfg.lr_drop)
