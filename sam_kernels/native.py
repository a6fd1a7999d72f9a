"""The "cpu" and "cuda" backends: the extension's ops, torch.ops.sam_kernels.*; the dispatcher
picks the CPU or CUDA kernel from the tensors' device."""
from __future__ import annotations

import torch


def _ops():
    return torch.ops.sam_kernels


def global_norm(tensors, weights, offset):
    return _ops().global_norm(tensors, weights or [], float(offset))


def perturb_(params, grads, olds, norm, rho, adaptive, offset):
    _ops().perturb_(params, grads, olds, norm, float(rho), bool(adaptive), float(offset))


def restore_(params, olds):
    _ops().restore_(params, olds)


def restore_sgd_(params, olds, grads, bufs, lr, momentum, dampening, nesterov, weight_decay, maximize, init_bufs,
                 grad_scale=1.0):
    _ops().restore_sgd_(
        params, olds, grads, bufs or [], float(lr), float(momentum), float(dampening), bool(nesterov),
        float(weight_decay), bool(maximize), bool(init_bufs), float(grad_scale),
    )


def restore_adam_(
    params, olds, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, lr, beta1, beta2, eps,
    weight_decay, decoupled, amsgrad, maximize, bias_correction1, bias_correction2, grad_scale=1.0,
):
    _ops().restore_adam_(
        params, olds, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs or [], float(lr), float(beta1), float(beta2),
        float(eps), float(weight_decay), bool(decoupled), bool(amsgrad), bool(maximize),
        float(bias_correction1), float(bias_correction2), float(grad_scale),
    )


def power_iteration_(mats, us, vs, sigmas, iters, tau):
    _ops().power_iteration_(mats, us, vs, sigmas, int(iters), float(tau))


def rank1_update_(mats, us, vs, scales):
    _ops().rank1_update_(mats, us, vs, scales)


def rank1_restore_sgd_(params, us, vs, scales, grads, bufs, lr, momentum, dampening, nesterov, weight_decay,
                       maximize, init_bufs, grad_scale=1.0):
    _ops().rank1_restore_sgd_(
        params, us, vs, scales, grads, bufs or [], float(lr), float(momentum), float(dampening), bool(nesterov),
        float(weight_decay), bool(maximize), bool(init_bufs), float(grad_scale),
    )


def rank1_restore_adam_(params, us, vs, scales, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, lr, beta1, beta2,
                        eps, weight_decay, decoupled, amsgrad, maximize, bias_correction1, bias_correction2,
                        grad_scale=1.0):
    _ops().rank1_restore_adam_(
        params, us, vs, scales, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs or [], float(lr), float(beta1),
        float(beta2), float(eps), float(weight_decay), bool(decoupled), bool(amsgrad), bool(maximize),
        float(bias_correction1), float(bias_correction2), float(grad_scale),
    )


def sampa_preview_sgd_(params, grads, perturbed, previews, bufs, norm, rho, lr, momentum, dampening, nesterov,
                       weight_decay, maximize, init_bufs):
    _ops().sampa_preview_sgd_(
        params, grads, perturbed, previews, bufs or [], norm, float(rho), float(lr), float(momentum),
        float(dampening), bool(nesterov), float(weight_decay), bool(maximize), bool(init_bufs),
    )


def sampa_preview_adam_(params, grads, perturbed, previews, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, norm, rho, lr,
                        beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize, bias_correction1,
                        bias_correction2):
    _ops().sampa_preview_adam_(
        params, grads, perturbed, previews, exp_avgs, exp_avg_sqs, max_exp_avg_sqs or [], norm, float(rho),
        float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), bool(decoupled), bool(amsgrad),
        bool(maximize), float(bias_correction1), float(bias_correction2),
    )


def sampa_update_sgd_(params, grads, grads2, bufs, lam, lr, momentum, dampening, nesterov, weight_decay, maximize,
                      init_bufs):
    _ops().sampa_update_sgd_(
        params, grads, grads2, bufs or [], float(lam), float(lr), float(momentum), float(dampening), bool(nesterov),
        float(weight_decay), bool(maximize), bool(init_bufs),
    )


def sampa_update_adam_(params, grads, grads2, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, lam, lr, beta1, beta2, eps,
                       weight_decay, decoupled, amsgrad, maximize, bias_correction1, bias_correction2):
    _ops().sampa_update_adam_(
        params, grads, grads2, exp_avgs, exp_avg_sqs, max_exp_avg_sqs or [], float(lam), float(lr), float(beta1),
        float(beta2), float(eps), float(weight_decay), bool(decoupled), bool(amsgrad), bool(maximize),
        float(bias_correction1), float(bias_correction2),
    )
