"""Variable-length attention for transformers' continuous batching, from torch alone.

Continuous batching packs every scheduled sequence into one row. With `sdpa` it then builds a dense
block-diagonal mask over all queries and all gathered keys of the step (and, with CUDA graphs, over the
padded sizes), and attends through it: the cost grows with the whole batch's keys for every query. Flash
attention's varlen kernel attends each sequence to its own keys only, but transformers reaches it only
through the `flash_attn` package or kernels downloaded from the Hugging Face Hub, neither of which a
locked-down GPU host has. torch ships the same kind of kernel as `torch.nn.attention.varlen.varlen_attn`
(torch >= 2.9, CUDA), so this module registers it as an attention implementation of its own.

The name contains "flash" on purpose: continuous batching keys its choices on that substring (no dense
mask, causal attention, the cumulative sequence lengths in the kwargs) and accepts no other names besides
`sdpa` and `paged|eager`. It has no "2" or "3" in it, so transformers never takes it for a flash-attn
package version, nor turns on its decode fast path (paged block tables, which `varlen_attn` does not take
in every torch version we support).
"""

from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

VARLEN_ATTENTION = "torch_flash_varlen"


def has_varlen_kernel() -> bool:
    """Whether this torch has `varlen_attn` (CUDA only: on the CPU the reference loop below runs)."""
    try:
        from torch.nn.attention import varlen
    except ImportError:
        return False
    return hasattr(varlen, "varlen_attn")


@functools.cache
def _kernel_kwargs() -> dict[str, Any]:
    """Bottom-right causal attention over grouped key heads, in the form this torch's `varlen_attn` takes:
    torch 2.9 has `is_causal`, later versions `window_size=(-1, 0)`; versions with `enable_gqa` want it said,
    earlier ones take fewer key heads than query heads as they come."""
    from torch.nn.attention import varlen

    parameters = inspect.signature(varlen.varlen_attn).parameters
    kwargs: dict[str, Any] = (
        {"is_causal": True} if "is_causal" in parameters else {"window_size": (-1, 0)}
    )
    if "enable_gqa" in parameters:
        kwargs["enable_gqa"] = True
    return kwargs


def _reference_varlen(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor,
    scale: float | None,
) -> torch.Tensor:
    """What `varlen_attn` computes, one sequence at a time with SDPA (the CPU has no varlen kernel).

    Queries are the last tokens of their sequence (a prefix may be cached), so query i of a sequence with
    q queries and k keys sees keys up to k - q + i: causal aligned bottom-right, as flash attention is.
    """
    import torch

    out = torch.zeros_like(query)
    num_sequences = cu_seq_q.numel() - 1
    for i in range(num_sequences):
        q0, q1 = int(cu_seq_q[i]), int(cu_seq_q[i + 1])
        k0, k1 = int(cu_seq_k[i]), int(cu_seq_k[i + 1])
        num_q, num_k = q1 - q0, k1 - k0
        if num_q == 0:
            continue
        rows = torch.arange(num_q, device=query.device)[:, None]
        cols = torch.arange(num_k, device=query.device)[None, :]
        visible = cols <= rows + (num_k - num_q)
        out[q0:q1] = torch.nn.functional.scaled_dot_product_attention(
            query[q0:q1].transpose(0, 1),
            key[k0:k1].transpose(0, 1),
            value[k0:k1].transpose(0, 1),
            attn_mask=visible,
            scale=scale,
            enable_gqa=True,
        ).transpose(0, 1)
    return out


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """An `AttentionInterface` function for continuous batching's packed batches.

    In: query [1, heads, q tokens, dim]; key and value [1, kv heads, k tokens, dim], as the paged cache's
    update returns them (each sequence's keys contiguous, in batch order); `cu_seq_lens_q`/`_k` and
    `max_length_q`/`_k` in the kwargs. Out: [1, q tokens, heads, dim], as transformers' flash wrapper
    returns it.
    """
    cu_seq_q = kwargs["cu_seq_lens_q"]
    cu_seq_k = kwargs["cu_seq_lens_k"]
    q, k, v = (x.squeeze(0).transpose(0, 1) for x in (query, key, value))  # [tokens, heads, dim]
    if q.is_cuda:
        import torch
        from torch.nn.attention import varlen

        # No `return_aux`: the kernel returns the output alone.
        out = cast(
            "torch.Tensor",
            varlen.varlen_attn(
                q,
                k,
                v,
                cu_seq_q.to(dtype=torch.int32),
                cu_seq_k.to(dtype=torch.int32),
                int(kwargs["max_length_q"]),
                int(kwargs["max_length_k"]),
                scale=scaling,
                **_kernel_kwargs(),
            ),
        )
    else:
        out = _reference_varlen(q, k, v, cu_seq_q, cu_seq_k, scaling)
    return out.unsqueeze(0), None


def use_varlen_attention(model: PreTrainedModel) -> None:
    """Registers the implementation with transformers and switches `model` to it.

    The switch sets the config directly: `set_attn_implementation` would treat any name with "flash" in it
    as a flash-attn package or a Hub kernel and try to import or download one.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN_ATTENTION, flash_attention_mask)
    model.config._attn_implementation = VARLEN_ATTENTION
