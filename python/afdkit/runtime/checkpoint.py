"""Where a worker's weights come from: seeded random weights or safetensors shards.

A worker reads only what it owns: an attention worker the attention tensors, the
embedding and the LM head; an FFN worker its slice of each FFN (a range of the
intermediate dimension, or a set of experts). :class:`TensorSource` is that narrow
interface; :class:`WeightsSource` serves it from a :class:`~afdkit.models.step3.Step3Weights`
and :class:`SafetensorsSource` from checkpoint shards (``*.safetensors``, with or
without ``model.safetensors.index.json``), reading slices lazily so that an FFN rank
never materialises the experts it does not hold. Tensor names are the public Step-3
ones (``model.layers.{i}.moe.gate_proj.weight`` ...); the multimodal checkpoint's
``language_model.`` prefix is accepted.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import torch

from afdkit.models.step3 import Step3Config, Step3Weights, _random_tensor, weight_shapes

_PREFIX = "language_model."


def _require_safetensors() -> Any:
    try:
        import safetensors  # noqa: F401
        import safetensors.torch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("afdkit.runtime: loading or writing safetensors checkpoints needs the 'safetensors' "
                          "package: pip install 'afdkit[runtime]' (or pip install safetensors)") from exc
    return safetensors


class TensorSource(Protocol):
    """Read access to checkpoint tensors by their Step-3 names."""

    def names(self) -> set[str]: ...

    def tensor(self, name: str) -> torch.Tensor: ...

    def narrow(self, name: str, dim: int, start: int, length: int) -> torch.Tensor: ...

    def select(self, name: str, indices: Sequence[int]) -> torch.Tensor: ...


class WeightsSource:
    """A :class:`TensorSource` over in-memory :class:`Step3Weights`."""

    def __init__(self, weights: Step3Weights) -> None:
        self.weights = weights

    def names(self) -> set[str]:
        return set(self.weights.tensors)

    def tensor(self, name: str) -> torch.Tensor:
        return self.weights[name]

    def narrow(self, name: str, dim: int, start: int, length: int) -> torch.Tensor:
        return self.weights[name].narrow(dim, start, length)

    def select(self, name: str, indices: Sequence[int]) -> torch.Tensor:
        return self.weights[name][torch.as_tensor(list(indices), dtype=torch.long)]


class RandomSource:
    """Seeded random weights by name, generated on demand (only what a worker reads).

    On CPU the values equal :meth:`Step3Weights.random` (same per-name seeding). On
    CUDA they are drawn on the device, per expert for stacked expert tensors, so that a
    full-width layer appears in milliseconds; every process that asks for a name gets
    the same values, so split and colocated runs hold identical weights.
    """

    def __init__(self, config: Step3Config, seed: int = 0, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        self.config, self.seed, self.device, self.dtype = config, seed, torch.device(device), dtype
        self._shapes = weight_shapes(config)

    def names(self) -> set[str]:
        return set(self._shapes)

    def _shape(self, name: str) -> tuple[int, ...]:
        try:
            return self._shapes[name]
        except KeyError:
            raise KeyError(f"afdkit.runtime: the model has no tensor {name!r}") from None

    def _draw(self, name: str, shape: tuple[int, ...], key: int) -> torch.Tensor:
        if self.device.type == "cpu":
            return _random_tensor(name, shape, self.seed).to(self.dtype)
        gen = torch.Generator(device=self.device).manual_seed(
            (self.seed * 1_000_003 + zlib.crc32(name.encode()) * 131 + key) % (1 << 63))
        t = torch.randn(shape, generator=gen, device=self.device, dtype=self.dtype)
        if name.endswith("norm.weight"):
            return 1.0 + 0.1 * t
        return t if name == "model.embed_tokens.weight" else t / math.sqrt(shape[-1])

    def tensor(self, name: str) -> torch.Tensor:
        shape = self._shape(name)
        if self.device.type != "cpu" and len(shape) == 3:
            return self.select(name, range(shape[0]))
        return self._draw(name, shape, 0)

    def narrow(self, name: str, dim: int, start: int, length: int) -> torch.Tensor:
        return self.tensor(name).narrow(dim, start, length)

    def select(self, name: str, indices: Sequence[int]) -> torch.Tensor:
        shape = self._shape(name)
        idx = list(indices)
        if self.device.type == "cpu":
            return self._draw(name, shape, 0)[torch.as_tensor(idx, dtype=torch.long)]
        if not idx:
            return torch.empty((0, *shape[1:]), device=self.device, dtype=self.dtype)
        return torch.stack([self._draw(name, shape[1:], 1 + e) for e in idx])


def _shard_files(path: str | os.PathLike) -> list[Path]:
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise FileNotFoundError(f"afdkit.runtime: no checkpoint at {str(p)!r} (a .safetensors file or a folder)")
    index = p / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({p / f for f in weight_map.values()})
    else:
        files = sorted(p.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"afdkit.runtime: {str(p)!r} holds no *.safetensors shards")
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(f"afdkit.runtime: the checkpoint index names missing shards {missing[:3]}")
    return files


class SafetensorsSource:
    """A :class:`TensorSource` over safetensors shards; tensors are read on demand."""

    def __init__(self, path: str | os.PathLike) -> None:
        _require_safetensors()
        from safetensors import safe_open

        self._files = _shard_files(path)
        self._handles = [safe_open(str(f), framework="pt", device="cpu") for f in self._files]
        self._where: dict[str, tuple[int, str]] = {}
        for i, h in enumerate(self._handles):
            for key in h.keys():
                name = key.removeprefix(_PREFIX)
                if name in self._where:
                    raise ValueError(f"afdkit.runtime: tensor {name!r} appears in two shards "
                                     f"({self._files[self._where[name][0]].name}, {self._files[i].name})")
                self._where[name] = (i, key)

    def names(self) -> set[str]:
        return set(self._where)

    def _slice(self, name: str) -> Any:
        try:
            i, key = self._where[name]
        except KeyError:
            raise KeyError(f"afdkit.runtime: the checkpoint has no tensor {name!r}") from None
        return self._handles[i].get_slice(key)

    def tensor(self, name: str) -> torch.Tensor:
        i, key = self._where.get(name, (None, None))
        if i is None:
            raise KeyError(f"afdkit.runtime: the checkpoint has no tensor {name!r}")
        return self._handles[i].get_tensor(key)

    def narrow(self, name: str, dim: int, start: int, length: int) -> torch.Tensor:
        sl = self._slice(name)
        index = [slice(None)] * len(sl.get_shape())
        index[dim] = slice(start, start + length)
        return sl[tuple(index)]

    def select(self, name: str, indices: Sequence[int]) -> torch.Tensor:
        sl = self._slice(name)
        idx = list(indices)
        if idx and idx == list(range(idx[0], idx[0] + len(idx))):
            return sl[idx[0] : idx[0] + len(idx)]  # contiguous experts: one read
        return torch.stack([sl[i : i + 1][0] for i in idx]) if idx else self.narrow(name, 0, 0, 0)


def check_source(config: Step3Config, source: TensorSource, names: Sequence[str] | None = None) -> None:
    """Raises KeyError/ValueError when the tensors a worker needs are missing or misshapen."""
    expected = weight_shapes(config)
    wanted = list(expected) if names is None else list(names)
    have = source.names()
    missing = [n for n in wanted if n not in have]
    if missing:
        raise KeyError(f"afdkit.runtime: the checkpoint lacks {len(missing)} tensor(s) this worker needs, "
                       f"e.g. {missing[:3]}")
    if isinstance(source, SafetensorsSource):
        for n in wanted:
            shape = tuple(source._slice(n).get_shape())
            if shape != expected[n]:
                raise ValueError(f"afdkit.runtime: checkpoint tensor {n} has shape {list(shape)}, the config "
                                 f"expects {list(expected[n])}")


def save_safetensors(weights: Step3Weights, folder: str | os.PathLike, *, max_shard_bytes: int = 1 << 30,
                     prefix: str = "") -> list[Path]:
    """Writes ``weights`` as safetensors shards plus ``model.safetensors.index.json``
    (the layout of published checkpoints). ``prefix`` (e.g. ``"language_model."``)
    is prepended to every name. Returns the shard paths."""
    _require_safetensors()
    from safetensors.torch import save_file

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in weights.tensors.items():
        nbytes = t.numel() * t.element_size()
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append({})
            size = 0
        groups[-1][prefix + name] = t.contiguous()
        size += nbytes
    paths, weight_map = [], {}
    for i, g in enumerate(groups):
        f = out / f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(g, str(f), metadata={"format": "pt"})
        paths.append(f)
        weight_map.update({k: f.name for k in g})
    total = sum(t.numel() * t.element_size() for t in weights.tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return paths


def load_weights(config: Step3Config, path: str | os.PathLike) -> Step3Weights:
    """Every tensor of a checkpoint as :class:`Step3Weights` (names and shapes checked)."""
    source = SafetensorsSource(path)
    check_source(config, source)
    state: Mapping[str, torch.Tensor] = {n: source.tensor(n) for n in weight_shapes(config)}
    return Step3Weights.from_state_dict(config, state)


__all__ = ["TensorSource", "WeightsSource", "RandomSource", "SafetensorsSource", "check_source", "save_safetensors",
           "load_weights"]
