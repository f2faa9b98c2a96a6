"""The ranks' rows as one tensor: one launch of all virtual ranks reads their inputs back to back."""

from __future__ import annotations

import torch


def _adjacent_view(xs: list[torch.Tensor]) -> torch.Tensor | None:
    """The rows of ``xs`` as one tensor without a copy when they are contiguous, adjacent views of
    one storage in rank order (e.g. combine inputs that are slices of the dispatch outputs)."""
    parts = [x for x in xs if x.numel()]
    if not parts:
        return None
    first = parts[0]
    storage = first.untyped_storage().data_ptr()
    end = first.data_ptr()
    for x in parts:
        if (
            not x.is_contiguous()
            or x.dtype != first.dtype
            or x.shape[1:] != first.shape[1:]
            or x.untyped_storage().data_ptr() != storage
            or x.data_ptr() != end
        ):
            return None
        end += x.numel() * x.element_size()
    rows = sum(x.shape[0] for x in xs)
    return first.as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())


def _cat_rows(xs: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat along rows (a view when the rows are already adjacent), also for float8."""
    view = _adjacent_view(xs)
    if view is not None:
        return view
    if xs[0].dtype == torch.float8_e4m3fn:
        return torch.cat([x.view(torch.uint8) for x in xs]).view(torch.float8_e4m3fn)
    return torch.cat(xs)
