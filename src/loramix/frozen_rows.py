"""Stacked parameters whose rows (experts, or per-task routers) can be frozen one by one and grown in place.

A frozen row's values are kept in a buffer and substituted with `torch.where` in :meth:`FrozenRows.effective`, so
it gets no gradient and stays bit-identical whatever the optimizer does to the parameter (weight decay, momentum).
`state_dict()` holds those kept values too, so a checkpoint written by any tool (`torch.save(model.state_dict())`,
accelerate, a trainer) reloads the frozen rows as they are used.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from loramix.errors import ConfigError


class FrozenRows(nn.Module):
    """Parameters named in `stacked` hold one row per item along dim 0 (or one row shared by all: first dim 1).

    Subclasses say how many rows there are (`num_rows`) and how new rows start (`reset_rows`), and call
    `_init_frozen()` once their parameters exist.
    """

    stacked: ClassVar[tuple[str, ...]] = ()

    @property
    def num_rows(self) -> int:
        raise NotImplementedError

    def reset_rows(self, rows: slice) -> None:
        raise NotImplementedError

    def _init_frozen(self) -> None:
        device = getattr(self, self.stacked[0]).device
        mask = torch.zeros(self.num_rows, dtype=torch.bool, device=device)
        self.register_buffer("frozen_mask", mask, persistent=False)
        for name in self.stacked:
            self.register_buffer(f"frozen_{name}", torch.zeros(0, device=device), persistent=False)
        self._any_frozen = False
        self.register_state_dict_post_hook(_effective_into_state_dict)

    def _is_shared(self, name: str) -> bool:
        return getattr(self, name).shape[0] == 1 and self.num_rows > 1

    def effective(self) -> dict[str, Tensor]:
        """Every stacked parameter with the frozen rows' kept values substituted."""
        out = {}
        for name in self.stacked:
            value = getattr(self, name)
            if self._any_frozen and not self._is_shared(name):
                shape = (-1,) + (1,) * (value.dim() - 1)
                value = torch.where(self.frozen_mask.view(shape), getattr(self, f"frozen_{name}"), value)
            out[name] = value
        return out

    def _check_rows(self, rows: list[int] | Tensor) -> Tensor:
        idx = torch.as_tensor(rows, dtype=torch.long).flatten()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_rows):
            raise ConfigError(f"index out of range 0..{self.num_rows - 1}: {idx.tolist()}")
        return idx.to(self.frozen_mask.device)

    @torch.no_grad()
    def freeze_rows(self, rows: list[int] | Tensor) -> None:
        idx = self._check_rows(rows)
        if not self._any_frozen:
            for name in self.stacked:
                setattr(self, f"frozen_{name}", getattr(self, name).detach().clone())
        mask = torch.zeros_like(self.frozen_mask)
        mask[idx] = True
        newly = mask & ~self.frozen_mask
        for name in self.stacked:
            if not self._is_shared(name):
                getattr(self, f"frozen_{name}")[newly] = getattr(self, name)[newly]
        self.frozen_mask |= mask
        self._any_frozen = bool(self.frozen_mask.any())

    @torch.no_grad()
    def unfreeze_rows(self, rows: list[int] | Tensor | None = None) -> None:
        if not self._any_frozen:
            return
        mask = torch.ones_like(self.frozen_mask) if rows is None else torch.zeros_like(self.frozen_mask)
        if rows is not None:
            mask[self._check_rows(rows)] = True
        mask &= self.frozen_mask
        for name in self.stacked:
            if not self._is_shared(name):
                getattr(self, name)[mask] = getattr(self, f"frozen_{name}")[mask]
        self.frozen_mask &= ~mask
        self._any_frozen = bool(self.frozen_mask.any())

    @torch.no_grad()
    def copy_row(self, source: int, target: int) -> None:
        """Give row `target` the values row `source` is used with (its kept ones when frozen); a shared row stays.
        `target` must not be frozen."""
        idx = self._check_rows([source, target])
        if bool(self.frozen_mask[idx[1]]):
            raise ConfigError(f"row {target} is frozen; unfreeze it before copying into it")
        for name, value in self.effective().items():
            if not self._is_shared(name):
                getattr(self, name)[target] = value[source]

    @property
    def frozen_rows(self) -> list[int]:
        return [int(i) for i in torch.arange(self.num_rows)[self.frozen_mask.cpu()]]

    @torch.no_grad()
    def sync_frozen_into_parameters(self) -> None:
        """Copy frozen values into the parameters so `state_dict()` holds the effective weights."""
        if self._any_frozen:
            for name in self.stacked:
                if not self._is_shared(name):
                    getattr(self, name)[self.frozen_mask] = getattr(self, f"frozen_{name}")[self.frozen_mask]

    @torch.no_grad()
    def grow_rows(self, num_rows: int, *, keep_shared: str = "none") -> None:
        """Add rows in place: old rows keep their exact values and frozen state; new rows start by `reset_rows`.
        A shared row (or the parameter named `keep_shared`) stays one row. Call before `num_rows` changes."""
        old = self.num_rows
        if num_rows < old:
            raise ConfigError(f"cannot shrink {old} rows to {num_rows}")
        if num_rows == old:
            return
        self.sync_frozen_into_parameters()
        frozen = self.frozen_rows
        for name in self.stacked:
            param = getattr(self, name)
            if name == keep_shared or self._is_shared(name):
                continue
            extra = param.new_zeros(num_rows - old, *param.shape[1:])
            setattr(self, name, nn.Parameter(torch.cat([param.detach(), extra]), param.requires_grad))
        self._init_frozen_rows(num_rows)
        self.reset_rows(slice(old, num_rows))
        if frozen:
            self.freeze_rows(frozen)

    def _init_frozen_rows(self, num_rows: int) -> None:
        device = getattr(self, self.stacked[0]).device
        self.frozen_mask = torch.zeros(num_rows, dtype=torch.bool, device=device)
        for name in self.stacked:
            setattr(self, f"frozen_{name}", torch.zeros(0, device=device))
        self._any_frozen = False


def _effective_into_state_dict(module: FrozenRows, state: dict, prefix: str, local_metadata: dict) -> None:
    """`state_dict()` post-hook: the frozen rows' kept values in place of the parameters' (which the optimizer may
    have moved). With `keep_vars=True` the entries stay the live parameters."""
    if not module._any_frozen:
        return
    for name, value in module.effective().items():
        key = prefix + name
        if key in state and not isinstance(state[key], nn.Parameter):
            state[key] = value.detach()
