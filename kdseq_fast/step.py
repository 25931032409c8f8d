"""The device step: forward, loss, backward, non-finite guard and optimizer update of one batch,
without waiting for the device.

On a GPU the host must run ahead of the kernels it launches; a single ``float(loss)`` or
``bool(isfinite)`` per step makes it wait for every kernel of the step, and a small model then
runs at the speed of the Python loop. So nothing here reads a device value:

- the non-finite guard is a device flag (``found``, 0 or 1): a NaN/inf loss or gradient makes the
  fused optimizer skip the update (as ``GradScaler`` does for fused optimizers) and restores the
  BatchNorm running statistics the forward pass already changed (one ``torch.where`` over a flat
  copy of all buffers); under DDP the ranks agree through a one-element all-reduce on the device;
- loss, accuracy, sample and skipped-step counts accumulate in a small device tensor;
- the host reads them with :meth:`DeviceStep.fold` at log intervals, epoch ends and checkpoints.

fp16 training uses a dynamic loss scale kept on the device (:class:`DynamicLossScale`); bf16 and
fp32 need none. A step whose scaled fp16 gradients overflow is skipped and halves the scale, as
``GradScaler`` does; it is counted apart (``scale_skips``), not as a non-finite step, unless the
loss itself is non-finite or the gradients overflow at a scale of at most 1.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .amp import amp_dtype

__all__ = ["DeviceStep", "StepGraphs", "DynamicLossScale", "BufferGuard", "FoldResult", "zero_momentum_buffers"]


class DynamicLossScale:
    """fp16 loss scaling on the device, the rule ``torch.amp.GradScaler`` uses: halve the scale on a
    non-finite step, double it after ``growth_interval`` finite steps in a row. Disabled: scale 1."""

    def __init__(self, device, enabled: bool, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000):
        self.enabled = bool(enabled)
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval = growth_interval
        self.scale = torch.full((), init_scale if enabled else 1.0, dtype=torch.float32, device=device)
        self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
        self.inv_scale = torch.ones((), dtype=torch.float32, device=device)

    def apply(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale if self.enabled else loss

    def unscale_and_check(self, grads: list, found: torch.Tensor) -> None:
        """Divides the gradients by the scale in place and ORs non-finite values into ``found``."""
        if self.enabled:
            torch.reciprocal(self.scale, out=self.inv_scale)
        if grads:
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found, self.inv_scale)

    def update(self, found: torch.Tensor) -> None:
        if self.enabled:
            torch._amp_update_scale_(self.scale, self.growth_tracker, found, self.growth_factor,
                                     self.backoff_factor, self.growth_interval)

    def state_dict(self) -> dict:
        return {"enabled": self.enabled, "scale": float(self.scale), "growth_tracker": int(self.growth_tracker)}

    def load_state_dict(self, state: dict) -> None:
        if bool(state.get("enabled")) != self.enabled:
            raise ValueError(f"loss-scale state is for enabled={state.get('enabled')}, this run has "
                             f"enabled={self.enabled} (train.amp changed?)")
        self.scale.fill_(state["scale"])
        self.growth_tracker.fill_(state["growth_tracker"])


class BufferGuard:
    """Undoes the BatchNorm running-statistics update of a rejected step without a host decision.

    The model's floating-point and integer buffers are re-pointed to views of one flat tensor per
    dtype, so a snapshot is one copy per dtype and the restore is one ``torch.where(found, ...)``
    (NaN-safe, unlike arithmetic blending). Call before wrapping the model in DDP or
    ``torch.compile``, after moving it to its device; ``load_state_dict`` copies into the views.
    """

    def __init__(self, model: torch.nn.Module):
        groups: dict = {}
        for module in model.modules():
            for name, buf in module._buffers.items():
                if buf is not None:
                    groups.setdefault((buf.dtype, buf.device), []).append((module, name, buf))
        self.flat, self.backup = [], []
        for (dtype, device), members in groups.items():
            flat = torch.empty(sum(b.numel() for _, _, b in members), dtype=dtype, device=device)
            offset = 0
            for module, name, buf in members:
                n = buf.numel()
                view = flat[offset:offset + n].view(buf.shape)
                view.copy_(buf)
                module._buffers[name] = view
                offset += n
            self.flat.append(flat)
            self.backup.append(torch.empty_like(flat))

    def snapshot(self) -> None:
        for src, dst in zip(self.flat, self.backup):
            dst.copy_(src)

    def restore_where(self, found_bool: torch.Tensor) -> None:
        for flat, backup in zip(self.flat, self.backup):
            torch.where(found_bool, backup, flat, out=flat)


def zero_momentum_buffers(optimizer: torch.optim.Optimizer) -> None:
    """Momentum buffers that exist from the start. torch's fused SGD treats a step with no buffers
    yet as the first and allocates them uninitialized; if that first step is skipped (a non-finite
    batch), the next step would read garbage. Zeros make every step alike (buf = m * 0 + grad equals
    the first-step rule with dampening 0)."""
    for group in optimizer.param_groups:
        if group.get("momentum", 0) == 0:
            continue
        if group.get("dampening", 0) != 0:
            raise ValueError("the device step needs dampening 0 for SGD with momentum")
        for p in group["params"]:
            state = optimizer.state[p]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def match_state_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give every per-parameter optimizer tensor (momentum buffers) its parameter's memory layout.

    ``Optimizer.load_state_dict`` keeps the strides the tensors were saved with. A checkpoint from
    a run whose models were not channels-last (a deterministic CPU run) resumed where they are (a
    GPU run, where ``channels_last: auto`` is on), or the other way round, would pair NHWC
    parameters with NCHW buffers: CUDA's fused SGD refuses that, and the CPU's fused SGD computes
    wrong updates (0.29 off on a conv layer in one step, measured with torch 2.14)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state:
                continue
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


@dataclass
class FoldResult:
    """What the device counted since the previous fold."""
    loss_sum: float      # sum over accepted samples of the batch-mean loss
    samples: int         # samples of accepted steps
    correct: int         # training predictions equal to the label (accepted steps)
    bad_steps: int       # steps rejected by the non-finite guard (train.nonfinite applies to them)
    first_bad: int       # global step number (1-based) of the first rejected step, or -1
    scale_skips: int = 0  # fp16: steps skipped because the scaled gradients overflowed (loss scaling at work)


class DeviceStep:
    """One optimizer step of ``train_model`` with the run's loss, guard and optimizer.

    Args:
        model: the bare module (buffers guarded, parameters optimized).
        train_model: what runs the forward pass (``model``, its DDP wrapper, or a compiled one).
        optimizer: SGD, ideally ``fused=True`` (the only kind that can skip a step on a device flag;
            otherwise the step reads the flag on the host: one synchronization a step).
        method: ``ce``, ``kd`` or ``isl``; ``teacher`` and ``loss`` settings for the last two.
        teacher_logits: optional (N, C) table of the teacher's logits on the un-augmented training
            set, used instead of a teacher forward pass when ``use_cached`` (no augmentation).
        guard: the model's :class:`BufferGuard`, when it had to be made before wrapping the model.
        all_reduce: a callable that MAX-reduces a device tensor in place across ranks (DDP), or None.
        cuda_graphs: replay the whole step as a CUDA graph (:class:`StepGraphs`): one launch a step
            instead of hundreds, for models too small to keep the GPU busy from Python.
    """

    def __init__(self, *, model: torch.nn.Module, train_model: Callable, optimizer: torch.optim.Optimizer,
                 device: torch.device, amp: str, method: str, temperature: float, kd_weight: float,
                 ce_weight: float, teacher: Optional[torch.nn.Module] = None, channels_last: bool = False,
                 guard: Optional["BufferGuard"] = None,
                 all_reduce: Optional[Callable[[torch.Tensor], None]] = None, cuda_graphs: bool = False):
        self.model, self.train_model, self.optimizer = model, train_model, optimizer
        self.device = torch.device(device)
        self.amp = amp
        self.amp_dtype = amp_dtype(amp)
        self.method = method
        self.temperature, self.kd_weight, self.ce_weight = temperature, kd_weight, ce_weight
        self.teacher = teacher
        self.channels_last = channels_last
        self.all_reduce = all_reduce
        self.teacher_logits: Optional[torch.Tensor] = None
        self.use_cached = False
        self.scaler = DynamicLossScale(self.device, enabled=amp == "fp16")
        # Built before DDP / torch.compile wrap the model when they do (they hold the buffers).
        self.guard = guard if guard is not None else BufferGuard(model)
        self.fused = any(g.get("fused") for g in optimizer.param_groups)
        if self.fused:
            zero_momentum_buffers(optimizer)
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        # loss_sum, samples, correct, bad_steps, scale_skips: float64 so that long epochs add exactly.
        self.sums = torch.zeros(5, dtype=torch.float64, device=self.device)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=self.device)
        self.step_count = torch.zeros((), dtype=torch.int64, device=self.device)
        self._zero = torch.zeros((), dtype=torch.float64, device=self.device)
        self.graphs: Optional[StepGraphs] = None
        if cuda_graphs:
            if self.device.type != "cuda" or not self.fused or all_reduce is not None:
                raise ValueError("CUDA graphs of the step need a CUDA device, the fused optimizer and a "
                                 f"single process (device {self.device}, fused={self.fused}, "
                                 f"distributed={all_reduce is not None})")
            self.graphs = StepGraphs(self)

    # ------------------------------------------------------------------ inputs
    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        # A captured graph must not keep autocast's cast-weight cache (torch.cuda.graph's rule).
        return torch.autocast(self.device.type, dtype=self.amp_dtype, cache_enabled=self.graphs is None)

    def set_teacher_logits(self, table: Optional[torch.Tensor], use_cached: bool) -> None:
        """The teacher's logits on the un-augmented training set (on this device when it fits)."""
        self.teacher_logits = table
        self.use_cached = bool(use_cached and table is not None)

    def _teacher_batch(self, indices: Optional[torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        if self.use_cached:
            idx = indices
            if idx.device != self.teacher_logits.device:
                # A host table (too large for the GPU) takes the indices back blocking: a
                # non-blocking device-to-host copy returns before its data arrives, and the host's
                # index_select would read a stale buffer (another batch's teacher logits).
                idx = idx.to(self.teacher_logits.device)
            return self.teacher_logits.index_select(0, idx).to(self.device, non_blocking=True)
        with torch.no_grad(), self.autocast():
            return self.teacher(images)

    # ------------------------------------------------------------------ the step
    def loss(self, logits: torch.Tensor, labels: torch.Tensor, indices: Optional[torch.Tensor],
             images: torch.Tensor) -> torch.Tensor:
        if self.method == "ce":
            return F.cross_entropy(logits.float(), labels)
        from .ops import kd_loss

        # Labels were validated once for the dataset: validate=False keeps the call sync-free.
        return kd_loss(logits, self._teacher_batch(indices, images), labels, temperature=self.temperature,
                       kd_weight=self.kd_weight, ce_weight=self.ce_weight, validate=False)

    def _inputs(self, batch: dict):
        images = self.to_input(batch["images"])
        labels = batch["labels"].to(self.device, non_blocking=True)
        indices = batch["indices"] if self.use_cached else None
        return images, labels, indices

    def run(self, batch: dict, weight: float = 1.0, timer=None) -> torch.Tensor:
        """Forward, backward, guarded update; returns the batch's mean loss as a device tensor.

        ``weight`` scales the loss for the backward pass only (the DDP rank weight). With CUDA
        graphs on, the returned tensor is the graph's output: the next step overwrites it."""
        if self.graphs is not None:
            return self.graphs.run(batch, weight, timer)
        return self._compute(*self._inputs(batch), weight, timer)

    def _compute(self, images, labels, indices, weight: float = 1.0, timer=None) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        self.guard.snapshot()
        t0 = timer.now() if timer else 0.0
        with self.autocast():
            logits = self.train_model(images)
        tl = timer.now() if timer else 0.0
        loss = self.loss(logits, labels, indices, images)
        if timer:
            timer.add("loss", timer.now() - tl)
        self.scaler.apply(loss * weight if weight != 1.0 else loss).backward()
        loss_bad = (~torch.isfinite(loss.detach())).float()
        found = loss_bad.clone()  # skip this update: a non-finite loss or gradient
        grads = [p.grad for p in self.params if p.grad is not None]
        self.scaler.unscale_and_check(grads, found)
        if self.scaler.enabled:
            # Scaled fp16 gradients that overflow are loss scaling at work (GradScaler skips the
            # step and halves the scale, about once every growth interval once the scale has
            # grown): a non-finite step in train.nonfinite's sense is a non-finite loss, or
            # gradients that overflow even at a scale of at most 1.
            bad = torch.maximum(loss_bad, found * (self.scaler.scale <= 1.0).float())
        else:
            bad = found
        if self.all_reduce is not None:
            flags = torch.stack([found, bad])
            self.all_reduce(flags)  # every rank skips, and reports, the same steps
            found, bad = flags[0], flags[1]
        found_bool = found > 0
        if self.fused:
            self.optimizer.grad_scale = None
            self.optimizer.found_inf = found
            self.optimizer.step()
        elif not bool(found_bool):  # non-fused optimizers cannot skip on a device flag
            self.optimizer.step()
        self.guard.restore_where(found_bool)
        self.scaler.update(found)
        # Device-side bookkeeping of the step.
        self.step_count += 1
        detached = loss.detach().double()
        b = float(labels.numel())
        correct = (logits.detach().argmax(1) == labels).sum()
        accepted = torch.where(found_bool, self._zero, detached * b)
        ok = 1.0 - found.double()
        self.sums += torch.stack([accepted, ok * b, correct.double() * ok, bad.double(), (found - bad).double()])
        torch.where((bad > 0) & (self.first_bad < 0), self.step_count, self.first_bad, out=self.first_bad)
        if timer:
            timer.add("model", timer.now() - t0)
        return loss.detach()

    # ------------------------------------------------------------------ reading the device
    def fold(self) -> FoldResult:
        """Reads (one synchronization) and resets the device counters."""
        values = torch.cat([self.sums, self.first_bad.view(1).double()]).tolist()
        first = int(values[5])
        self.sums.zero_()
        self.first_bad.fill_(-1)
        return FoldResult(values[0], int(round(values[1])), int(round(values[2])), int(round(values[3])), first,
                          int(round(values[4])))

    def set_step_count(self, step: int) -> None:
        self.step_count.fill_(int(step))

    def params_finite(self) -> bool:
        with torch.no_grad():
            tensors = [t for t in self.model.state_dict().values() if t.is_floating_point()]
            if not tensors:
                return True
            norms = torch._foreach_norm(tensors, ord=float("inf"))
            return bool(torch.isfinite(torch.stack(norms)).all())

    def state_dict(self) -> dict:
        return {"loss_scale": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.scaler.load_state_dict(state["loss_scale"])


class StepGraphs:
    """The device step captured as a CUDA graph and replayed: the host launches one graph a step
    instead of every kernel of the forward, loss, backward, guard and optimizer (a small model at
    batch 256 is otherwise limited by Python's launch rate, not by the GPU).

    Works because the step never reads the device and writes only persistent tensors: parameters,
    momentum buffers, the flat BatchNorm buffers, the loss scale and the counters. Each step copies
    its batch into static input buffers and replays. Steps that do not fit the graph run eagerly
    on the same tensors, so the two mix freely: a batch of another shape (an epoch's last, partial
    batch), a DDP rank weight other than 1, the first ``warmup`` steps (run on a side stream, as
    capture requires, so lazy initialization and cuDNN's algorithm search happen before it). A graph
    bakes in the learning rate and the teacher-logit table it was captured with; a change of either
    captures a new one. Capture failures raise (a step that cannot be captured is a bug).
    """

    def __init__(self, step: DeviceStep, warmup: int = 3):
        self.step = step
        self.warmup = warmup
        self.warm_steps = 0
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.key = None
        self.shape = None
        self.static: dict = {}
        self.out: Optional[torch.Tensor] = None
        self.captures = 0
        self.replays = 0

    def _key(self):
        s = self.step
        lrs = tuple(float(g["lr"]) for g in s.optimizer.param_groups)
        table = s.teacher_logits if s.use_cached else None
        # The graph holds addresses: a loaded optimizer state or moved parameter needs a new one.
        state = s.optimizer.state
        where = tuple(p.data_ptr() for p in s.params) + tuple(
            state[p]["momentum_buffer"].data_ptr() for p in s.params if "momentum_buffer" in state[p])
        return lrs, s.use_cached, None if table is None else (table.data_ptr(), tuple(table.shape)), where

    def _fits(self, images: torch.Tensor, weight: float) -> bool:
        s = self.step
        if weight != 1.0 or not s.model.training:
            return False
        if s.use_cached and s.teacher_logits.device != s.device:
            return False  # a host table's gather copies from pageable memory: not capturable
        sig = (tuple(images.shape), images.dtype, images.stride())
        if self.shape is None or images.shape[0] > self.shape[0][0]:
            # The graph is for the full batch: a run resumed at an epoch's partial last batch sees
            # that one first. A new shape warms up again (cuDNN's search cannot run in a capture).
            self.shape, self.graph, self.warm_steps = sig, None, 0
        return sig == self.shape

    def run(self, batch: dict, weight: float, timer=None) -> torch.Tensor:
        s = self.step
        images, labels, indices = s._inputs(batch)
        if not self._fits(images, weight):
            return s._compute(images, labels, indices, weight, timer)
        t0 = timer.now() if timer else 0.0
        if self.warm_steps < self.warmup:
            self.warm_steps += 1
            side = torch.cuda.Stream(s.device)
            side.wait_stream(torch.cuda.current_stream(s.device))
            with torch.cuda.stream(side):
                out = s._compute(images, labels, indices, weight, None)
            torch.cuda.current_stream(s.device).wait_stream(side)
        else:
            key = self._key()
            if self.graph is None or key != self.key:
                self._capture(images, labels, indices, key)
            self.static["images"].copy_(images, non_blocking=True)
            self.static["labels"].copy_(labels, non_blocking=True)
            if indices is not None:
                self.static["indices"].copy_(indices, non_blocking=True)
            self.graph.replay()
            self.replays += 1
            out = self.out
        if timer:
            timer.add("model", timer.now() - t0)
        return out

    def _capture(self, images, labels, indices, key) -> None:
        s = self.step
        self.graph = self.out = None
        self.static = {"images": images.clone(memory_format=torch.preserve_format), "labels": labels.clone(),
                       "indices": None if indices is None else indices.to(s.device).clone()}
        graph = torch.cuda.CUDAGraph()
        s.optimizer.zero_grad(set_to_none=True)
        # thread_local: the data loader's threads may touch CUDA (pinned copies) during capture.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = s._compute(self.static["images"], self.static["labels"], self.static["indices"])
        self.graph, self.out, self.key = graph, out, key
        self.captures += 1
