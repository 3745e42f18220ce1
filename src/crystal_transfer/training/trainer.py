"""The training loop, separate from the models: optimiser and schedule from config, best-on-validation
checkpointing, a per-epoch metrics CSV, resumable after a hard kill with the same final numbers.

Determinism: the batch order of epoch ``e`` comes from a generator seeded with (seed, e), and the global
torch RNG is re-seeded the same way at the start of every epoch, so a run resumed from the checkpoint of
epoch ``e - 1`` continues exactly as the uninterrupted run would have (on CPU).
"""

from __future__ import annotations

import ctypes
import itertools
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from crystal_transfer.atomic import write_csv
from crystal_transfer.errors import InputError
from crystal_transfer.progress import Counter
from crystal_transfer.tensor_files import TensorFileError, load_tensors, save_tensors
from crystal_transfer.training.losses import masked_mse_loss
from crystal_transfer.training.normalizer import Normalizer

CHECKPOINT_FILE = "last.pt"
BEST_FILE = "best.pt"
METRICS_FILE = "metrics.csv"

T = TypeVar("T")

# What picks best.pt and what patience watches: the validation loss (MSE of standardised targets, the trainer's
# criterion) or the validation MAE (original CGCNN keeps the epoch of lowest validation MAE).
MONITORS = ("val_loss", "val_mae")
# Passes over at least this many crystals log their progress (with crystals/s) ten times; a terminal always shows it.
PROGRESS_LOG_FROM = 50_000


@dataclass
class TrainSettings:
    """How to train: every field comes from the config's ``train`` section."""

    epochs: int = 30
    batch_size: int = 64
    optimizer: str = "sgd"  # "sgd" (with momentum, as CGCNN) or "adam"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_milestones: list[int] = field(default_factory=lambda: [100])
    lr_gamma: float = 0.1
    seed: int = 0
    device: str = "auto"  # "auto": CUDA when available, else CPU
    patience: int | None = None  # stop after this many epochs without a better monitored figure; 0/None: off
    monitor: str = "val_loss"  # one of MONITORS
    layer_lr_decay: float = 1.0  # finetune: each layer below the head learns at this factor of the one above it
    max_batches: int | None = None  # at most this many batches per pass: smoke tests and benchmarks of large data

    def __post_init__(self) -> None:
        if self.patience is not None and self.patience < 0:
            raise InputError(f"patience must be >= 0 (0 or null: no early stopping), not {self.patience}")
        if self.monitor not in MONITORS:
            raise InputError(f"monitor must be one of {', '.join(MONITORS)}, not {self.monitor!r}")
        if not 0 < self.layer_lr_decay <= 1:
            raise InputError(f"layer_lr_decay must be in (0, 1] (1: one learning rate), not {self.layer_lr_decay}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainSettings:
        """Settings from a config section; unknown keys are an error naming them."""
        return settings_from_dict(cls, data, "training")


def settings_from_dict(cls: type[T], data: dict[str, Any], what: str, ignored: frozenset[str] = frozenset()) -> T:
    """The dataclass ``cls`` from a config section; a key that is neither a field nor ``ignored`` is an error."""
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(data) - known - ignored)
    if unknown:
        raise InputError(f"unknown {what} setting(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return cls(**{key: value for key, value in data.items() if key in known})


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_ALLOCATOR_TUNED: list[bool] = []


def tune_allocator() -> bool:
    """Keep PyTorch's CPU tensors of up to 32 MB on glibc's heap instead of fresh ``mmap`` pages.

    glibc serves blocks above its mmap threshold with ``mmap`` and gives them back with ``munmap``, so every
    (atoms × 12 × 128) edge tensor of a CGCNN step (about 10 MB for 64 crystals) is a new mapping whose pages
    are faulted in and zeroed by the kernel, which costs a training step measurably (benchmarks/README.md). Raising
    the mmap threshold to its maximum (32 MB on 64-bit) and the trim threshold to 1 GiB keeps freed blocks for
    reuse; the cost is that up to 1 GiB of freed memory stays with the process. Process-wide, idempotent;
    does nothing off Linux/glibc or with ``CRYSTAL_TRANSFER_MALLOC_TUNING=0``. Returns whether it applied.
    """
    if _ALLOCATOR_TUNED:
        return _ALLOCATOR_TUNED[0]
    applied = False
    if sys.platform.startswith("linux") and os.environ.get("CRYSTAL_TRANSFER_MALLOC_TUNING", "1") != "0":
        try:
            libc = ctypes.CDLL("libc.so.6")
            applied = bool(libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))
        except (OSError, AttributeError):  # not glibc (musl, ...): keep the allocator as it is
            applied = False
    _ALLOCATOR_TUNED.append(applied)
    return applied


def pick_device(name: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"device {name!r} is not a torch device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name!r} asked for, but this torch ({torch.__version__}) sees no CUDA GPU: "
                         "use device: auto (CUDA when there is one, else the CPU) or cpu")
    return device


def make_optimizer(model: nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    """SGD with momentum (CGCNN's default) or Adam over the trainable parameters; a model with ``lr_scales``
    (parameter-name prefix -> factor, set by a finetune transfer) gets one group per factor, lr times it."""
    scales: dict[str, float] = getattr(model, "lr_scales", None) or {}
    groups: dict[float, list[nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            factor = next((f for prefix, f in scales.items() if name.startswith(prefix)), 1.0)
            groups.setdefault(factor, []).append(parameter)
    params = [{"params": group, "lr": settings.lr * factor} for factor, group in groups.items()]
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    if settings.optimizer == "adam":
        return torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay)
    raise InputError(f"optimizer must be 'sgd' or 'adam', not {settings.optimizer!r}")


def freeze_batchnorm_of_frozen_layers(model: nn.Module) -> None:
    """Put every BatchNorm whose parameters are all frozen in eval mode (CGCNN lets them drift)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters())
            if params and not any(p.requires_grad for p in params):
                module.eval()


class Batch(Protocol):
    """What the trainer needs of a batch (a :class:`~crystal_transfer.graphs.batch.GraphBatch`, a
    :class:`~crystal_transfer.models.set_model.FeatureBatch`): physical targets (B, T), ids, a device move."""

    targets: torch.Tensor
    ids: list[str]

    def to(self, device: torch.device | str) -> Batch: ...


def _set_aside(path: Path) -> Path:
    """Rename a damaged file to ``<name>.damaged-N`` (the first N free) so that nothing reads it again."""
    n = 1
    while (aside := path.with_name(f"{path.name}.damaged-{n}")).exists():
        n += 1
    path.rename(aside)
    return aside


_NO_BEST = {"epoch": 0, "val_loss": math.inf, "score": math.inf}


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919) % (2**63 - 1)


class Trainer:
    """Trains a model whose ``forward(batch)`` returns (B, T) standardised predictions.

    ``collate_fn`` turns a list of the dataset's items into a :class:`Batch`; ``loss_fn(predictions, targets)``
    compares (B, T) standardised predictions with standardised targets, NaN where a label is missing.
    """

    def __init__(
        self,
        model: nn.Module,
        normalizers: Sequence[Normalizer],
        settings: TrainSettings,
        out_dir: str | Path,
        collate_fn: Callable[[list[Any]], Batch],
        log: Callable[[str], None] = print,
        run_fingerprint: str = "",
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = masked_mse_loss,
    ) -> None:
        tune_allocator()
        self.device = pick_device(settings.device)
        self.model = model.to(self.device)
        self.normalizers = list(normalizers)
        self.settings = settings
        self.out_dir = Path(out_dir)
        self.collate_fn = collate_fn
        self.log = log
        self.run_fingerprint = run_fingerprint
        self.loss_fn = loss_fn
        self.optimizer = make_optimizer(self.model, settings)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, milestones=settings.lr_milestones, gamma=settings.lr_gamma
        )
        self.mean = torch.tensor([n.mean for n in self.normalizers], dtype=torch.float32, device=self.device)
        self.std = torch.tensor([n.std for n in self.normalizers], dtype=torch.float32, device=self.device)
        self.targets: list[str] = list(getattr(model, "targets", [f"target{i}" for i in range(len(normalizers))]))

    # -- target handling ----------------------------------------------------------------------------------

    def _transformed(self, targets: torch.Tensor) -> torch.Tensor:
        """Physical targets (B, T) to transformed units (log10 where the normaliser says so)."""
        columns = [n.forward_transform(targets[:, i]) for i, n in enumerate(self.normalizers)]
        return torch.stack(columns, dim=1)

    def _loader(self, dataset: Dataset, shuffle: bool, epoch: int) -> DataLoader:
        generator = torch.Generator().manual_seed(_epoch_seed(self.settings.seed, epoch))
        return DataLoader(
            dataset,
            batch_size=self.settings.batch_size,
            shuffle=shuffle,
            generator=generator,
            collate_fn=self.collate_fn,
            num_workers=0,
        )

    def _batches(self, dataset: Dataset, shuffle: bool, epoch: int, label: str) -> Iterator[Batch]:
        """The batches of one pass (at most ``max_batches``), showing progress with the crystals per second."""
        cap = self.settings.max_batches
        total = len(dataset) if cap is None else min(len(dataset), cap * self.settings.batch_size)
        progress = Counter(total, label, self.log, log_from=PROGRESS_LOG_FROM)
        for batch in itertools.islice(self._loader(dataset, shuffle, epoch), cap):
            yield batch
            progress.advance(len(batch.targets))

    def _run_epoch(self, dataset: Dataset, epoch: int, training: bool) -> dict[str, float]:
        """One pass; returns loss (mean over labels, standardised units) and MAE per target (transformed units)."""
        self.model.train(training)
        if training:
            freeze_batchnorm_of_frozen_layers(self.model)
        squared_sum = 0.0
        label_count = 0
        abs_sum = torch.zeros(len(self.normalizers), dtype=torch.float64)
        per_target = torch.zeros(len(self.normalizers), dtype=torch.float64)
        label = f"epoch {epoch} {'train' if training else 'val'}"
        with torch.set_grad_enabled(training):
            for batch in self._batches(dataset, training, epoch, label):
                batch = batch.to(self.device)
                transformed = self._transformed(batch.targets)
                standardised = (transformed - self.mean) / self.std
                predictions = self.model(batch)
                loss = self.loss_fn(predictions, standardised)
                if training:
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    self.optimizer.step()
                present = ~torch.isnan(transformed)
                count = int(present.sum())
                squared_sum += float(loss.detach()) * count
                label_count += count
                errors = (predictions.detach() * self.std + self.mean - transformed).abs()
                abs_sum += torch.where(present, errors, torch.zeros_like(errors)).sum(0).double().cpu()
                per_target += present.sum(0).double().cpu()
        result = {"loss": squared_sum / max(label_count, 1)}
        for index, name in enumerate(self.targets):
            result[f"mae_{name}"] = float(abs_sum[index] / per_target[index]) if per_target[index] else math.nan
        return result

    def _score(self, val: dict[str, float]) -> float:
        """The monitored validation figure, lower is better: the loss, or the MAE (with several targets each MAE
        over its normaliser's std, averaged, so that no unit outweighs another)."""
        if self.settings.monitor == "val_loss":
            return val["loss"]
        scaled = [val[f"mae_{name}"] / n.std for name, n in zip(self.targets, self.normalizers, strict=True)
                  if not math.isnan(val[f"mae_{name}"])]
        return sum(scaled) / len(scaled) if scaled else math.inf

    # -- checkpoints ----------------------------------------------------------------------------------------

    def _save_checkpoint(self, epoch: int, best: dict[str, Any], history: list[dict[str, float]]) -> None:
        state = {
            "epoch": epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "best": best,
            "history": history,
            "run_fingerprint": self.run_fingerprint,
            "settings": asdict(self.settings),
        }
        save_tensors(state, self.out_dir / CHECKPOINT_FILE)

    def _resume(self) -> tuple[int, dict[str, Any], list[dict[str, float]]]:
        path = self.out_dir / CHECKPOINT_FILE
        if not path.is_file():
            return 0, _NO_BEST.copy(), []
        try:
            state = load_tensors(path, f"checkpoint {path}", map_location=self.device)
        except TensorFileError as exc:  # e.g. a kill while the file system wrote it: keep it aside, start afresh
            aside = _set_aside(path)
            self.log(f"{exc}: moved it to {aside.name} and starting this run afresh")
            return 0, _NO_BEST.copy(), []
        # a setting added since the checkpoint was written had its default then
        saved_settings = {**asdict(TrainSettings()), **state.get("settings", {})}
        if state.get("run_fingerprint") != self.run_fingerprint or saved_settings != asdict(self.settings):
            self.log(f"checkpoint {path} belongs to another run (data or settings differ): starting afresh")
            return 0, _NO_BEST.copy(), []
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.log(f"resuming from {path}: epoch {state['epoch']} of {self.settings.epochs} done")
        # a checkpoint from before ``monitor`` existed monitored the loss (else its settings differ, above)
        best = {"score": state["best"]["val_loss"], **state["best"]}
        return int(state["epoch"]), best, list(state["history"])

    def _write_metrics(self, history: list[dict[str, float]]) -> None:
        write_csv(self.out_dir / METRICS_FILE, list(history[0]), history)

    # -- the loop -----------------------------------------------------------------------------------------------

    def _patience_spent(self, epoch: int, best: dict[str, Any]) -> bool:
        """Whether early stopping ends the run after ``epoch`` (``patience`` epochs without a better monitored
        validation figure)."""
        patience = self.settings.patience
        return bool(patience) and epoch - best["epoch"] >= patience

    def fit(self, train_data: Dataset, val_data: Dataset) -> dict[str, Any]:
        """Train for the configured epochs (resuming if a checkpoint of this run exists), or until ``patience``
        epochs pass without a better validation loss or MAE (``monitor``).

        Returns ``{"best_epoch", "val_loss", "history"}`` (the validation loss of the best epoch); the best
        weights are in ``best.pt``.
        """
        self.out_dir.mkdir(parents=True, exist_ok=True)
        done, best, history = self._resume()
        for epoch in range(done + 1, self.settings.epochs + 1):
            if self._patience_spent(epoch - 1, best):  # checked first, so a resumed run stops where it would have
                watched = "loss" if self.settings.monitor == "val_loss" else "MAE"
                self.log(f"early stop after epoch {epoch - 1}: no better validation {watched} "
                         f"since epoch {best['epoch']}")
                break
            torch.manual_seed(_epoch_seed(self.settings.seed, epoch))
            started = time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]
            train = self._run_epoch(train_data, epoch, training=True)
            val = self._run_epoch(val_data, epoch, training=False)
            self.scheduler.step()
            row: dict[str, float] = {"epoch": epoch, "lr": lr, "train_loss": train["loss"], "val_loss": val["loss"]}
            for name in self.targets:
                row[f"train_mae_{name}"] = train[f"mae_{name}"]
                row[f"val_mae_{name}"] = val[f"mae_{name}"]
            row["seconds"] = round(time.perf_counter() - started, 3)
            history.append(row)
            score = self._score(val)
            if score < best["score"]:
                best = {"epoch": epoch, "val_loss": val["loss"], "score": score}
                save_tensors(self.model.state_dict(), self.out_dir / BEST_FILE)
            self._write_metrics(history)
            self._save_checkpoint(epoch, best, history)
            maes = ", ".join(f"{name} {val[f'mae_{name}']:.4f}" for name in self.targets)
            self.log(
                f"epoch {epoch}/{self.settings.epochs}: train loss {train['loss']:.4f}, "
                f"val loss {val['loss']:.4f}, val MAE {maes} ({row['seconds']:.1f} s)"
            )
        if history:  # also when every epoch was done before a kill: a rerun's outputs were removed by Snakemake
            self._write_metrics(history)
        if not (self.out_dir / BEST_FILE).is_file():
            raise RuntimeError("no epoch was trained: set epochs >= 1")
        best_path = self.out_dir / BEST_FILE
        self.model.load_state_dict(load_tensors(best_path, f"best weights {best_path}", map_location=self.device))
        return {"best_epoch": best["epoch"], "val_loss": best["val_loss"], "history": history}

    @torch.no_grad()
    def predict(self, dataset: Dataset) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """(ids, predictions, targets) in transformed units (log10 where the normaliser says so)."""
        self.model.eval()
        ids: list[str] = []
        outputs, targets = [], []
        for batch in self._batches(dataset, False, 0, "predict"):
            batch = batch.to(self.device)
            outputs.append((self.model(batch) * self.std + self.mean).cpu())
            targets.append(self._transformed(batch.targets).cpu())
            ids.extend(batch.ids)
        return ids, torch.cat(outputs), torch.cat(targets)
