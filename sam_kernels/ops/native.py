"""The "cpu" and "cuda" backends: the extension's ops, torch.ops.sam_kernels.*; the dispatcher
picks the CPU or CUDA kernel from the tensors' device.

Two ways in: the list ops (public, traceable: a table is built on every call), and for the
optimizers' step plans `prepare_<op>(lists...)`, which builds the tables once with
torch.ops.sam_kernels._table and returns a function that launches with scalars only
(torch.ops.sam_kernels._launch): no list of tensors crosses into C++ per step. The argument
order of each kernel is the table at the top of csrc/ops.cpp.
"""
from __future__ import annotations

import torch

from .lists import Live, dtype_groups, on_refresh, pick


def _ops():
    return torch.ops.sam_kernels


# --- the list ops ----------------------------------------------------------------------------

def global_norm(tensors, weights, offset):
    return _ops().global_norm(tensors, weights or [], float(offset))


def check_grads_(grads, grads2, lam, flags, prior, scale, found_inf, max_norm, steps, steps_mask):
    _ops().check_grads_(grads, grads2 or [], float(lam), flags, prior, scale, found_inf, float(max_norm), steps,
                        steps_mask)


def perturb_(params, grads, olds, norm, rho, adaptive, offset):
    _ops().perturb_(params, grads, olds, norm, float(rho), bool(adaptive), float(offset))


def restore_(params, olds, found_inf=None):
    _ops().restore_(params, olds, found_inf)


def restore_sgd_(params, olds, grads, bufs, lr, momentum, dampening, nesterov, weight_decay, maximize, init_bufs,
                 grad_scale=None, found_inf=None):
    _ops().restore_sgd_(params, olds, grads, bufs or [], float(lr), float(momentum), float(dampening), bool(nesterov),
                        float(weight_decay), bool(maximize), bool(init_bufs), grad_scale, found_inf)


def restore_adam_(params, olds, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2, eps,
                  weight_decay, decoupled, amsgrad, maximize, grad_scale=None, found_inf=None):
    _ops().restore_adam_(params, olds, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs or [], state_steps, float(lr),
                         float(beta1), float(beta2), float(eps), float(weight_decay), bool(decoupled), bool(amsgrad),
                         bool(maximize), grad_scale, found_inf)


def power_iteration_(mats, us, vs, sigmas, iters, tau):
    _ops().power_iteration_(mats, us, vs, sigmas, int(iters), float(tau))


def rank1_update_(mats, us, vs, scales):
    _ops().rank1_update_(mats, us, vs, scales)


def rank1_scales_(sigmas, rho, normalized, scales, prior):
    _ops().rank1_scales_(sigmas, rho, normalized, scales, prior)


def rank1_restore_sgd_(params, us, vs, scales, grads, bufs, lr, momentum, dampening, nesterov, weight_decay,
                       maximize, init_bufs, grad_scale=None, found_inf=None):
    _ops().rank1_restore_sgd_(params, us, vs, scales, grads, bufs or [], float(lr), float(momentum), float(dampening),
                              bool(nesterov), float(weight_decay), bool(maximize), bool(init_bufs), grad_scale,
                              found_inf)


def rank1_restore_adam_(params, us, vs, scales, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1,
                        beta2, eps, weight_decay, decoupled, amsgrad, maximize, grad_scale=None, found_inf=None):
    _ops().rank1_restore_adam_(params, us, vs, scales, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs or [],
                               state_steps, float(lr), float(beta1), float(beta2), float(eps), float(weight_decay),
                               bool(decoupled), bool(amsgrad), bool(maximize), grad_scale, found_inf)


def sampa_preview_sgd_(params, grads, perturbed, previews, bufs, norm, rho, lr, momentum, dampening, nesterov,
                       weight_decay, maximize, init_bufs):
    _ops().sampa_preview_sgd_(params, grads, perturbed, previews, bufs or [], norm, float(rho), float(lr),
                              float(momentum), float(dampening), bool(nesterov), float(weight_decay), bool(maximize),
                              bool(init_bufs))


def sampa_preview_adam_(params, grads, perturbed, previews, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, norm,
                        rho, lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize):
    _ops().sampa_preview_adam_(params, grads, perturbed, previews, exp_avgs, exp_avg_sqs, max_exp_avg_sqs or [],
                               state_steps, norm, float(rho), float(lr), float(beta1), float(beta2), float(eps),
                               float(weight_decay), bool(decoupled), bool(amsgrad), bool(maximize))


def sampa_update_sgd_(params, grads, grads2, bufs, lam, lr, momentum, dampening, nesterov, weight_decay, maximize,
                      init_bufs, grad_scale=None, found_inf=None):
    _ops().sampa_update_sgd_(params, grads, grads2, bufs or [], float(lam), float(lr), float(momentum),
                             float(dampening), bool(nesterov), float(weight_decay), bool(maximize), bool(init_bufs),
                             grad_scale, found_inf)


def sampa_update_adam_(params, grads, grads2, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lam, lr, beta1,
                       beta2, eps, weight_decay, decoupled, amsgrad, maximize, grad_scale=None, found_inf=None):
    _ops().sampa_update_adam_(params, grads, grads2, exp_avgs, exp_avg_sqs, max_exp_avg_sqs or [], state_steps,
                              float(lam), float(lr), float(beta1), float(beta2), float(eps), float(weight_decay),
                              bool(decoupled), bool(amsgrad), bool(maximize), grad_scale, found_inf)


# --- prepared launches: tables built once, launches with scalars only -------------------------

class _Bound:
    """Kernel `kernel` bound to `lists` (absent optional lists None): one table per dtype group."""

    def __init__(self, kernel: str, lists, values=()):
        present = [lst for lst in lists if lst is not None]
        self.kernel = kernel
        self.parts = []  # (table, meta) per dtype group
        for _, index in dtype_groups(present[0]):
            lists = [pick(lst, index) for lst in present]
            vals = [v for column in values for v in pick(column, index)]
            table, meta = _ops()._table([t for lst in lists for t in lst], len(present), vals)
            self.parts.append((table, meta))
            for i, lst in enumerate(lists):  # a step plan's gradients: their new addresses into the table
                if isinstance(lst, Live):
                    on_refresh(lambda table=table, at=i * len(index), lst=lst: _patch(table, at, lst))
        self.n_chunks = sum(meta[3] for _, meta in self.parts)

    def __call__(self, scalars, options, args):
        launch = _ops()._launch
        scalars, device_scalars = _device_scalars(scalars)
        for table, meta in self.parts:
            launch(self.kernel, table, meta, scalars, options, args, device_scalars)


def _device_scalars(values):
    """(floats, device scalars): a value given as a tensor (a capturable step's lr or rho, an fp32
    device scalar) is read by the kernel when it runs; its float slot is a placeholder."""
    if not any(isinstance(v, torch.Tensor) for v in values):
        return [float(v) for v in values], []
    return ([0.0 if isinstance(v, torch.Tensor) else float(v) for v in values],
            [v if isinstance(v, torch.Tensor) else None for v in values])


def _patch(table: torch.Tensor, at: int, tensors) -> None:
    """Write the addresses of the live list `tensors` into table[at:] (without waiting for the device)."""
    ptrs = tensors.addresses()
    if table.device.type != "cpu":
        ptrs = ptrs.pin_memory()
    table[at:at + len(tensors)].copy_(ptrs, non_blocking=True)


def _rank1_values(mats):
    return [[m.shape[1] for m in mats], list(range(len(mats)))]


def prepare_sumsq(tensors, second=None):
    """run(partials, mode, scalar, at): one partial per chunk of every dtype group into partials[at:]."""
    bound = _Bound("sumsq", [tensors, second])
    launch = _ops()._launch

    def run(partials, mode, scalar, at=0):
        for table, meta in bound.parts:
            launch("sumsq", table, meta, [float(scalar)], [int(mode), at], [partials], [])
            at += meta[3]

    run.n_partials = bound.n_chunks
    return run


def norm_finalize(partials, out):
    """out <- sqrt(sum(partials)) (every element of partials is a sum of squares)."""
    _ops()._launch("norm_finalize", None, [], [], [], [partials, out], [])


def guard_finalize(partials, flags, prior=None, scale=None, found_inf=None, max_norm=float("inf"), steps=None,
                   steps_mask=None):
    """The guard of check_grads_ from the sums of squares in partials."""
    _ops()._launch("guard_finalize", None, [], [float(max_norm)], [],
                   [partials, flags, prior, scale, found_inf, steps, steps_mask], [])


def prepare_perturb_(params, grads, olds):
    bound = _Bound("perturb_", [params, grads, olds])
    return lambda norm, rho, adaptive, offset: bound([rho, offset], [bool(adaptive)], [norm])


def prepare_restore_(params, olds):
    bound = _Bound("restore_", [params, olds])
    return lambda found_inf=None: bound([], [], [found_inf])


def _sgd_run(bound, lam=None):
    def run(lr, momentum, dampening, nesterov, weight_decay, maximize, init_bufs, grad_scale=None, found_inf=None,
            scales=None, lam=lam):
        scalars = [lr, momentum, dampening, weight_decay]
        bound(scalars + ([lam] if lam is not None else []), [bool(nesterov), bool(maximize), bool(init_bufs)],
              [grad_scale, found_inf] + ([scales] if scales is not None else []))
    return run


def prepare_restore_sgd_(params, olds, grads, bufs, momentum):
    return _sgd_run(_Bound("restore_sgd_", [params, olds, grads, bufs if momentum != 0 else None]))


def prepare_rank1_restore_sgd_(params, us, vs, grads, bufs, momentum):
    run = _sgd_run(_Bound("rank1_restore_sgd_", [params, grads, us, vs, bufs if momentum != 0 else None],
                          _rank1_values(params)))
    return lambda scales, **kw: run(scales=scales, **kw)


def prepare_sampa_update_sgd_(params, grads, grads2, bufs, momentum):
    run = _sgd_run(_Bound("sampa_update_sgd_", [params, grads, grads2, bufs if momentum != 0 else None]), lam=0.0)
    return lambda lam, **kw: run(lam=lam, **kw)


def _adam_run(bound, lam=None):
    def run(lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize, grad_scale=None, found_inf=None,
            scales=None, lam=lam):
        scalars = [lr, beta1, beta2, eps, weight_decay]
        bound(scalars + ([lam] if lam is not None else []), [bool(decoupled), bool(amsgrad), bool(maximize)],
              [grad_scale, found_inf] + ([scales] if scales is not None else []))
    return run


def prepare_restore_adam_(params, olds, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad):
    return _adam_run(_Bound("restore_adam_", [params, olds, grads, exp_avgs, exp_avg_sqs, state_steps,
                                              max_exp_avg_sqs if amsgrad else None]))


def prepare_rank1_restore_adam_(params, us, vs, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad):
    run = _adam_run(_Bound("rank1_restore_adam_", [params, grads, exp_avgs, exp_avg_sqs, state_steps, us, vs,
                                                   max_exp_avg_sqs if amsgrad else None], _rank1_values(params)))
    return lambda scales, **kw: run(scales=scales, **kw)


def prepare_sampa_update_adam_(params, grads, grads2, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad):
    run = _adam_run(_Bound("sampa_update_adam_", [params, grads, grads2, exp_avgs, exp_avg_sqs, state_steps,
                                                  max_exp_avg_sqs if amsgrad else None]), lam=0.0)
    return lambda lam, **kw: run(lam=lam, **kw)


def prepare_sampa_preview_sgd_(params, grads, perturbed, previews, bufs, momentum, init_bufs):
    bound = _Bound("sampa_preview_sgd_", [params, grads, perturbed, previews,
                                          bufs if momentum != 0 and not init_bufs else None])

    def run(norm, rho, lr, momentum, dampening, nesterov, weight_decay, maximize, init_bufs):
        bound([rho, lr, momentum, dampening, weight_decay],
              [bool(nesterov), bool(maximize), bool(init_bufs)], [norm])
    return run


def prepare_sampa_preview_adam_(params, grads, perturbed, previews, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                state_steps, amsgrad):
    bound = _Bound("sampa_preview_adam_", [params, grads, perturbed, previews, exp_avgs, exp_avg_sqs, state_steps,
                                           max_exp_avg_sqs if amsgrad else None])

    def run(norm, rho, lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize):
        bound([rho, lr, beta1, beta2, eps, weight_decay],
              [bool(decoupled), bool(amsgrad), bool(maximize)], [norm])
    return run


def prepare_power_iteration_(mats, us, vs, warm=None):
    """run(sigmas, iters, tau) from the warm start `warm` (default: us) into us, vs (CPU kernel:
    csrc/cpu/power_iteration.cpp; matrices with no element are not touched)."""
    bound = _Bound("power_iteration_", [mats, us, vs, warm if warm is not None else us],
                   [[m.shape[0] for m in mats], [m.shape[1] for m in mats], list(range(len(mats)))])
    return lambda sigmas, iters, tau: bound([float(tau)], [int(iters)], [sigmas])


def prepare_rank1_scales_():
    return _ops().rank1_scales_


def prepare_rank1_update_(mats, us, vs):
    bound = _Bound("rank1_update_", [mats, us, vs], _rank1_values(mats))
    return lambda scales: bound([], [], [scales])
