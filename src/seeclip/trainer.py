"""The training loop of every prompt-learning method, on cached features (the image encoder is
never in this loop).

It is handed a model, the loss terms to minimise, the decision rule that turns logits into
predictions and the pseudo-unknown sources, and knows no method by name: each method's module
(:mod:`seeclip.methods`) assembles these. Batches are balanced over source domains; in each
domain's share of a batch about ``pseudo_fraction`` of the slots hold pseudo-unknowns (label C).
AdamW, gradient clipping, model selection by a named rule of :mod:`seeclip.selection` on source
validation only (never the target). It builds no source and reads no file.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from seeclip import distributed, metrics
from seeclip.config import TrainConfig
from seeclip.features import (
    Features,
    ModelFollowingSource,
    Prediction,
    PseudoSources,
    PseudoUnknownSource,
    draw,
)
from seeclip.io import UnreadableFileError, load_checkpoint, write_with
from seeclip.selection import Selection

CHECKPOINT_FORMAT = 1  # bump when the training checkpoint's contents change
VAL_PSEUDO_SEED_OFFSET = 1_000_003  # the held-out pseudo-unknowns' own generator seed
LossFn = Callable[[object, Tensor], dict[str, Tensor]]


class BalancedBatches:
    """Per step: an equal share of the batch from each source domain, pseudo-unknowns inside it.

    Each domain's images are drawn without replacement from a reshuffled cycle, so every image
    is seen once per cycle. The pseudo-unknown count of a domain is floor(f * share) plus one
    with probability frac(f * share): about ``fraction`` of the share on average.
    """

    def __init__(
        self,
        domains: tuple[str, ...],
        batch_size: int,
        *,
        pseudo_fraction: float,
        generator: torch.Generator,
    ) -> None:
        names = sorted(set(domains))
        if batch_size < len(names):
            raise ValueError(f"batch_size {batch_size} < number of source domains {len(names)}")
        self.generator = generator
        self.pools = {d: torch.tensor([i for i, x in enumerate(domains) if x == d]) for d in names}
        base, extra = divmod(batch_size, len(names))
        self.shares = {d: base + (i < extra) for i, d in enumerate(names)}
        self.pseudo_fraction = pseudo_fraction
        self._queues: dict[str, list[int]] = {d: [] for d in names}

    def _take(self, domain: str, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            if not self._queues[domain]:
                pool = self.pools[domain]
                self._queues[domain] = pool[
                    torch.randperm(len(pool), generator=self.generator)
                ].tolist()
            need = n - len(out)
            out += self._queues[domain][:need]
            self._queues[domain] = self._queues[domain][need:]
        return out

    def next(self) -> tuple[list[int], dict[str, int]]:
        """(indices of real images, pseudo-unknown count per domain) for one step."""
        real, pseudo = [], {}
        for d, share in self.shares.items():
            expected = self.pseudo_fraction * share
            k = int(expected) + int(torch.rand(1, generator=self.generator) < expected % 1)
            k = min(k, share - 1)  # every domain keeps at least one real image
            pseudo[d] = k
            real += self._take(d, share - k)
        return real, pseudo


GRAD_SAMPLES_PER_EPOCH = 4  # steps per epoch at which each term's gradient norm is measured


@dataclass
class TrainLog:
    losses: list[dict[str, float]]  # per epoch, mean of each loss term
    val: list[dict[str, float]]  # per epoch, source-validation criteria (empty for "last")
    selected_epoch: int
    # per epoch: diagnostics of the loss (e.g. rep_active), and per weighted term k its mean
    # gradient norm grad_norm_k and share grad_share_k = ||g_k|| / sum_j ||g_j||
    terms: list[dict[str, float]] = field(default_factory=list)

    def records(self) -> list[dict]:
        """One ``kind="epoch"`` record per epoch: loss terms, their gradient shares, and
        source-val criteria."""
        out = []
        for i, losses in enumerate(self.losses):
            rec: dict = {"kind": "epoch", "epoch": i + 1, "selected": i + 1 == self.selected_epoch}
            rec.update({f"loss_{k}": round(v, 6) for k, v in losses.items()})
            if i < len(self.terms):
                rec.update({k: round(v, 6) for k, v in self.terms[i].items()})
            if i < len(self.val):
                rec.update({f"val_{k}": round(v, 6) for k, v in self.val[i].items()})
            out.append(rec)
        return out


def term_gradient_norms(
    terms: Mapping[str, Tensor], weights: Mapping[str, float], params: list[Tensor]
) -> dict[str, float]:
    """||d(w_k term_k)/d params|| of each weighted term (0 for a term that does not reach them).

    The graph is kept, so the total can still be back-propagated afterwards.
    """
    norms = {}
    for k, w in weights.items():
        term = terms.get(k)
        if term is None or w == 0 or not term.requires_grad:
            norms[k] = 0.0
            continue
        grads = torch.autograd.grad(w * term, params, retain_graph=True, allow_unused=True)
        norms[k] = math.sqrt(sum(float(g.pow(2).sum()) for g in grads if g is not None))
    return norms


class PromptTrainer:
    """A learnable prompt model as a method: ``fit`` on source features, ``predict`` images.

    ``rule`` (a :class:`seeclip.methods.scoring.DecisionRule`) turns logits into the open-set
    prediction and the unknown score; a thresholded rule gets its threshold from the
    source-validation images after training.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        *,
        rule,
        term_weights: Mapping[str, float] | None = None,
        train: TrainConfig,
        selection: Selection,
        pseudo: PseudoSources | None = None,
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        if rule.needs_unknown_prompt != model.has_unknown_prompt:
            has = "has" if model.has_unknown_prompt else "has no"
            raise ValueError(
                f"decision rule {rule.name} does not fit a model that {has} unknown prompt"
            )
        if selection.needs_val_pseudo and not model.has_unknown_prompt:
            raise ValueError(
                f"selection={selection.name} scores rejection by the unknown prompt; this model "
                f"has none (use train.selection=val_acc or last)"
            )
        if selection.needs_val_pseudo and pseudo is None:
            raise ValueError(
                f"selection={selection.name} needs pseudo-unknowns (train.pseudo_unknowns)"
            )
        self.model = model
        self.loss_fn = loss_fn
        # weight of each loss term in the total; other keys of loss_fn's dict are diagnostics
        self.term_weights = dict(term_weights) if term_weights is not None else {"ali": 1.0}
        self.cfg = train
        self.selection = selection
        self.pseudo = pseudo
        self.rule = rule
        self.seed = seed
        self.progress = progress
        self.num_known = model.num_known
        self.threshold: float | None = None
        self.log: TrainLog | None = None

    def history(self) -> list[dict]:
        """Per-epoch records of the last :meth:`fit` (empty before it)."""
        return self.log.records() if self.log else []

    # ------------------------------------------------------------------ training
    def fit(
        self,
        train: Features,
        train_labels: Tensor,
        val: Features,
        val_labels: Tensor,
        *,
        checkpoint: Path | None = None,
        checkpoint_every: int = 1,
    ) -> None:
        """Trains on the source features; with ``checkpoint`` the whole training state is
        written there (atomically) every ``checkpoint_every`` epochs, and a checkpoint found
        there is resumed from: the result is bitwise the uninterrupted run's on CPU."""
        cfg, model, rule = self.cfg, self.model, self.selection
        if len(val) == 0 and (self.rule.needs_threshold or rule.criterion is not None):
            why = "its threshold" if self.rule.needs_threshold else f"selection={rule.name}"
            raise ValueError(
                f"{why} needs source-validation images and this split has none: raise "
                f"data.val_fraction or prepare more images per class"
            )
        gen = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)
        source: PseudoUnknownSource | None = None
        if model.has_unknown_prompt and self.pseudo is not None:
            source = self.pseudo.train()
            if isinstance(source, ModelFollowingSource):  # the online generator
                source.follow(model)
        batches = BalancedBatches(
            train.domains,
            cfg.batch_size,
            pseudo_fraction=cfg.pseudo_fraction if source else 0.0,
            generator=gen,
        )
        val_pseudo = self._val_pseudo(val) if rule.needs_val_pseudo else None
        # pseudo-unknown sources are built above, on the CPU; the model goes to the device
        with distributed.placed(model) as dev:
            self._fit_on(
                dev,
                train,
                train_labels,
                val,
                val_labels,
                source,
                batches,
                gen,
                val_pseudo,
                checkpoint,
                checkpoint_every,
            )

    def _fit_on(
        self,
        dev,
        train,
        train_labels,
        val,
        val_labels,
        source,
        batches,
        gen,
        val_pseudo,
        checkpoint,
        checkpoint_every,
    ) -> None:
        cfg, model, rule = self.cfg, self.model, self.selection
        params = [p for p in model.learnable_parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        world, rank = distributed.world_size(), distributed.rank()
        # torchrun: each rank runs rows rank::world of the global batch; DDP averages gradients
        net = model
        if world > 1:
            ids = [dev.index] if dev.type == "cuda" else None
            net = nn.parallel.DistributedDataParallel(
                model, device_ids=ids, forward_sync_buffers=False
            )
        steps = math.ceil(len(train) / cfg.batch_size)
        log = TrainLog([], [], cfg.epochs)
        best: tuple[float, int, dict] | None = None
        start = 0
        if checkpoint is not None and checkpoint.exists():
            start, best = self._resume(checkpoint, opt, gen, batches, log)
        bar = tqdm(
            total=cfg.epochs * steps,
            initial=start * steps,
            disable=not self.progress,
            desc="train",
            unit="step",
        )
        every = max(1, steps // GRAD_SAMPLES_PER_EPOCH)
        for epoch in range(start + 1, cfg.epochs + 1):
            model.train()
            sums: dict[str, float] = {}
            grad_sums: dict[str, float] = {}
            for step in range(steps):
                g, t, y = (
                    x.to(dev) for x in self._batch(batches, train, train_labels, source, gen, step)
                )
                if world > 1:
                    g, t, y = g[rank::world], t[rank::world], y[rank::world]
                terms = self.loss_fn(net(g, t), y)
                if step % every == 0:
                    norms = term_gradient_norms(terms, self.term_weights, params)
                    for k, v in norms.items():
                        grad_sums[k] = grad_sums.get(k, 0.0) + v
                opt.zero_grad(set_to_none=True)
                terms["total"].backward()
                nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                bar.update()
                bar.set_postfix(epoch=epoch, loss=f"{float(terms['total'].detach()):.3f}")
            log.losses.append(
                {k: sums[k] / steps for k in ("total", *self.term_weights) if k in sums}
            )
            log.terms.append(self._term_summary(sums, grad_sums, steps, every))
            if rule.criterion is not None:
                crit = self._val_criteria(val, val_labels, val_pseudo)
                log.val.append(crit)
                score = rule.score(crit)
                if best is None or score > best[0]:
                    best = (score, epoch, copy.deepcopy(model.state_dict_learnable()))
            if (
                checkpoint is not None
                and checkpoint_every > 0
                and (epoch % checkpoint_every == 0 or epoch == cfg.epochs)
            ):
                if distributed.is_main():  # one writer; every rank resumes from it
                    self._save_checkpoint(checkpoint, epoch, opt, gen, batches, log, best)
                distributed.barrier()
        bar.close()
        if best is not None:
            model.load_state_dict_learnable(best[2])
            log.selected_epoch = best[1]
        self.log = log
        model.eval()
        if self.rule.needs_threshold:  # confidence = 1 - unknown score, on source val only
            self.threshold = self.rule.threshold(1.0 - self._scores(val)[2])

    def _identity(self) -> dict:
        """What a checkpoint must have been written with to be resumed."""
        return {
            "seed": self.seed,
            "train": dataclasses.asdict(self.cfg),
            "selection": self.selection.name,
            "weights": dict(self.term_weights),
            "parameters": sorted(self.model.state_dict_learnable()),
        }

    def _save_checkpoint(self, path: Path, epoch: int, opt, gen, batches, log, best) -> None:
        """The whole training state after ``epoch``: parameters, optimiser, both random
        generators, the batch sampler's queues, the log and the selection's best so far."""
        state = {
            "format": CHECKPOINT_FORMAT,
            "identity": json.dumps(self._identity(), sort_keys=True, default=str),
            "epoch": epoch,
            "model": self.model.state_dict_learnable(),
            "optimizer": opt.state_dict(),
            "generator": gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "queues": {d: list(q) for d, q in batches._queues.items()},
            "log": {"losses": log.losses, "val": log.val, "terms": log.terms},
            "best": None
            if best is None
            else {"score": best[0], "epoch": best[1], "state": best[2]},
        }
        write_with(path, lambda tmp: torch.save(state, tmp))

    def _resume(self, path: Path, opt, gen, batches, log) -> tuple[int, tuple | None]:
        try:
            state = load_checkpoint(path)
        except UnreadableFileError as err:
            pickled = isinstance(err.__cause__, pickle.UnpicklingError)
            why = "holds more than tensors (never unpickled)" if pickled else "is cut short"
            raise ValueError(
                f"{path} is damaged: it {why}; delete it, or rerun with --force, and training "
                f"starts again from its first epoch"
            ) from err
        if state.get("format") != CHECKPOINT_FORMAT or state.get("identity") != json.dumps(
            self._identity(), sort_keys=True, default=str
        ):
            raise ValueError(
                f"{path} was written by another training setup; delete it (or "
                "rerun with --force) to start this run afresh"
            )
        self.model.load_state_dict_learnable(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        batches._queues = {d: list(q) for d, q in state["queues"].items()}
        log.losses[:], log.val[:], log.terms[:] = (
            state["log"][k] for k in ("losses", "val", "terms")
        )
        b = state["best"]
        best = None if b is None else (b["score"], b["epoch"], b["state"])
        return int(state["epoch"]), best

    def _term_summary(self, sums, grad_sums, steps: int, every: int) -> dict[str, float]:
        """An epoch's diagnostics (means over steps) and per-term gradient norms and shares."""
        out = {k: v / steps for k, v in sums.items() if k != "total" and k not in self.term_weights}
        samples = len(range(0, steps, every))
        norms = {k: v / samples for k, v in grad_sums.items()}
        whole = sum(norms.values())
        for k, v in norms.items():
            out[f"grad_norm_{k}"] = v
            out[f"grad_share_{k}"] = v / whole if whole > 0 else 0.0
        return out

    def _batch(self, batches, train, labels, source, gen, step) -> tuple[Tensor, Tensor, Tensor]:
        real, pseudo = batches.next()
        if isinstance(source, ModelFollowingSource):
            source.prepare(step, pseudo, gen)
        idx = torch.tensor(real)
        g, t, y = [train.global_[idx].float()], [train.tokens[idx].float()], [labels[idx]]
        for domain, n in pseudo.items():
            if n and source is not None:
                pg, pt = source.sample(domain, n, gen)
                g.append(pg)
                t.append(pt)
                y.append(torch.full((n,), self.num_known, dtype=torch.long))
        return torch.cat(g), torch.cat(t), torch.cat(y)

    def _val_pseudo(self, val: Features) -> tuple[Tensor, Tensor]:
        """Held-out pseudo-unknowns for selection, from the source-val source, own generator."""
        source = self.pseudo.val() if self.pseudo is not None else None
        if source is None:
            raise ValueError(
                f"selection={self.selection.name} needs pseudo-unknowns (train.pseudo_unknowns)"
            )
        gen = torch.Generator().manual_seed(self.seed + VAL_PSEUDO_SEED_OFFSET)
        n = max(1, len(val) // (2 * len(set(val.domains))))
        return draw(source, val.domains, n, gen)

    @torch.no_grad()
    def _val_criteria(self, val: Features, val_labels: Tensor, val_pseudo) -> dict[str, float]:
        """Source-val criteria of :mod:`seeclip.selection`: closed-set accuracy, and with
        held-out pseudo-unknowns the (C+1)-way known accuracy, rejection rate and H."""
        y_pred, closed, _ = self._scores(val)
        y_val = val_labels.numpy()
        out = {"closed_acc": metrics.closed_set_acc(y_val, closed)}
        if val_pseudo is not None:
            pred_u = self._logits(*val_pseudo).argmax(-1).numpy()
            y_true = np.concatenate([y_val, np.full(len(pred_u), -1)])
            y_all = np.concatenate([y_pred, pred_u])
            c = self.num_known
            out["acc_known"] = metrics.acc_known(y_true, y_all, num_known=c)
            out["acc_unknown"] = metrics.acc_unknown(y_true, y_all, num_known=c)
            out["h_score"] = metrics.h_score(y_true, y_all, num_known=c)
        return out

    # ---------------------------------------------------------------- prediction
    @torch.no_grad()
    def _logits(self, g: Tensor, t: Tensor, batch: int = 256) -> Tensor:
        """Logits on the CPU, computed on this process's device."""
        self.model.eval()
        with distributed.placed(self.model) as dev:
            out = [
                self.model(
                    g[i : i + batch].to(dev).float(), t[i : i + batch].to(dev).float()
                ).logits.cpu()
                for i in range(0, len(g), batch)
            ]
        return torch.cat(out)

    def _scores(self, images: Features) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(open-set prediction before thresholding, closed prediction, unknown score)."""
        return self.rule.scores(self._logits(images.global_, images.tokens), self.num_known)

    def predict(self, images: Features) -> Prediction:
        scored = self._scores(images)
        y_pred = self.rule.decide(scored, 1.0 - scored[2], self.threshold, self.num_known)
        return Prediction(y_pred, scored[1], scored[2])

    # ------------------------------------------------------------- checkpoints
    def state(self) -> dict[str, Tensor]:
        """Learnable parameters only (the frozen CLIP is rebuilt from the config)."""
        sd = {k: v.detach().clone() for k, v in self.model.state_dict_learnable().items()}
        if self.threshold is not None:
            sd["__threshold__"] = torch.tensor(self.threshold, dtype=torch.float64)
        return sd

    def load_state(self, state: dict[str, Tensor]) -> None:
        state = dict(state)
        thr = state.pop("__threshold__", None)
        self.threshold = None if thr is None else float(thr)
        self.model.load_state_dict_learnable(state)
        self.model.eval()


__all__ = ["BalancedBatches", "PromptTrainer", "TrainLog"]
