"""Training a prompt model on cached features: the image encoder is never in this loop.

Batches are balanced over source domains; in each domain's share of a batch about
``pseudo_fraction`` of the slots hold pseudo-unknowns (label C). AdamW, gradient clipping,
model selection on source validation only (never the target).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from seeclip.config import TrainConfig
from seeclip.features import Features, Prediction
from seeclip.generate import feature_diffusion  # noqa: F401  (registers "diffusion")
from seeclip.pseudo import PSEUDO_UNKNOWNS, PseudoContext, PseudoUnknownSource

SELECTIONS = ("last", "val_acc", "val_h")
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


@dataclass
class TrainLog:
    losses: list[dict[str, float]]  # per epoch, mean of each loss term
    val: list[dict[str, float]]  # per epoch, source-validation criteria
    selected_epoch: int


class PromptTrainer:
    """A learnable prompt model as a method: ``fit`` on source features, ``predict`` images.

    Models with an unknown prompt decide over C+1 classes and score unknowns by the softmax
    mass of class C; the others use 1 - max softmax probability and a threshold chosen as the
    ``threshold_quantile`` quantile of source-validation confidences.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        *,
        train: TrainConfig,
        threshold_quantile: float = 0.05,
        seed: int = 0,
        progress: bool = True,
        pseudo_context: dict | None = None,
    ) -> None:
        if train.selection not in SELECTIONS:
            raise ValueError(f"unknown selection {train.selection!r}; choose one of {SELECTIONS}")
        PSEUDO_UNKNOWNS.get(train.pseudo_unknowns)  # fail early on a bad name
        if train.selection == "val_h" and not model.has_unknown_prompt:
            raise ValueError(
                "selection=val_h scores rejection by the unknown prompt; this model has none "
                "(use train.selection=val_acc or last)"
            )
        self.model = model
        self.loss_fn = loss_fn
        self.cfg = train
        self.threshold_quantile = threshold_quantile
        self.seed = seed
        self.progress = progress
        self.pseudo_context = pseudo_context or {}  # backbone, class_texts, template, options
        self.num_known = model.num_known
        self.threshold: float | None = None
        self.log: TrainLog | None = None

    # ------------------------------------------------------------------ training
    def fit(self, train: Features, train_labels: Tensor, val: Features, val_labels: Tensor) -> None:
        cfg, model = self.cfg, self.model
        gen = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)
        use_pseudo = model.has_unknown_prompt and cfg.pseudo_unknowns != "none"
        source: PseudoUnknownSource | None = None
        if use_pseudo:
            source = self._pseudo_source(train, train_labels)
        batches = BalancedBatches(
            train.domains,
            cfg.batch_size,
            pseudo_fraction=cfg.pseudo_fraction if source else 0.0,
            generator=gen,
        )
        val_pseudo = (
            self._val_pseudo(val, train, train_labels) if cfg.selection == "val_h" else None
        )
        params = [p for p in model.learnable_parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps = math.ceil(len(train) / cfg.batch_size)
        log = TrainLog([], [], cfg.epochs)
        best: tuple[float, int, dict] | None = None
        bar = tqdm(total=cfg.epochs * steps, disable=not self.progress, desc="train", unit="step")
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            sums: dict[str, float] = {}
            for _ in range(steps):
                g, t, y = self._batch(batches, train, train_labels, source, gen)
                terms = self.loss_fn(model(g, t), y)
                opt.zero_grad(set_to_none=True)
                terms["total"].backward()
                nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                bar.update()
                bar.set_postfix(epoch=epoch, loss=f"{float(terms['total'].detach()):.3f}")
            log.losses.append({k: v / steps for k, v in sums.items()})
            if cfg.selection != "last":
                crit = self._val_criteria(val, val_labels, val_pseudo)
                log.val.append(crit)
                score = crit["acc_known"] if cfg.selection == "val_acc" else crit["h_score"]
                if best is None or score > best[0]:
                    best = (score, epoch, copy.deepcopy(model.state_dict_learnable()))
        bar.close()
        if best is not None:
            model.load_state_dict_learnable(best[2])
            log.selected_epoch = best[1]
        self.log = log
        model.eval()
        if not model.has_unknown_prompt:
            conf = 1.0 - self._scores(val)[2]
            self.threshold = float(np.quantile(conf, self.threshold_quantile))

    def _batch(self, batches, train, labels, source, gen) -> tuple[Tensor, Tensor, Tensor]:
        real, pseudo = batches.next()
        idx = torch.tensor(real)
        g, t, y = [train.global_[idx].float()], [train.tokens[idx].float()], [labels[idx]]
        for domain, n in pseudo.items():
            if n and source is not None:
                pg, pt = source.sample(domain, n, gen)
                g.append(pg)
                t.append(pt)
                y.append(torch.full((n,), self.num_known, dtype=torch.long))
        return torch.cat(g), torch.cat(t), torch.cat(y)

    def _val_pseudo(self, val: Features, train: Features, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Held-out pseudo-unknowns for selection: drawn with their own fixed generator."""
        source = self._pseudo_source(train, labels)
        if source is None:
            raise ValueError("selection=val_h needs pseudo-unknowns (train.pseudo_unknowns)")
        gen = torch.Generator().manual_seed(self.seed + 1_000_003)
        domains = sorted(set(val.domains))
        n = max(1, len(val) // (2 * len(domains)))
        parts = [source.sample(d, n, gen) for d in domains]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _pseudo_source(self, train: Features, labels: Tensor) -> PseudoUnknownSource | None:
        ctx = PseudoContext(
            train, labels, seed=self.seed, progress=self.progress, **self.pseudo_context
        )
        return PSEUDO_UNKNOWNS.get(self.cfg.pseudo_unknowns)(ctx)

    @torch.no_grad()
    def _val_criteria(self, val: Features, val_labels: Tensor, val_pseudo) -> dict[str, float]:
        """Source-val known accuracy (C+1 decision) and, for val_h, held-out pseudo rejection."""
        y_pred, _, _ = self._scores(val)
        out = {"acc_known": float(np.mean(y_pred == val_labels.numpy()))}
        if val_pseudo is not None:
            pred_u = self._logits(*val_pseudo).argmax(-1).numpy()
            out["acc_unknown"] = float(np.mean(pred_u == self.num_known))
            a, u = out["acc_known"], out["acc_unknown"]
            out["h_score"] = 0.0 if a + u == 0 else 2 * a * u / (a + u)
        return out

    # ---------------------------------------------------------------- prediction
    @torch.no_grad()
    def _logits(self, g: Tensor, t: Tensor, batch: int = 256) -> Tensor:
        self.model.eval()
        out = [
            self.model(g[i : i + batch].float(), t[i : i + batch].float()).logits
            for i in range(0, len(g), batch)
        ]
        return torch.cat(out)

    def _scores(self, images: Features) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(open-set prediction before thresholding, closed prediction, unknown score)."""
        logits = self._logits(images.global_, images.tokens)
        c = self.num_known
        closed = logits[:, :c].argmax(-1)
        prob = logits.softmax(-1)
        if self.model.has_unknown_prompt:
            return logits.argmax(-1).numpy(), closed.numpy(), prob[:, c].numpy()
        return closed.numpy(), closed.numpy(), (1.0 - prob.max(-1).values).numpy()

    def predict(self, images: Features) -> Prediction:
        y_pred, closed, score = self._scores(images)
        if not self.model.has_unknown_prompt:
            if self.threshold is None:
                raise RuntimeError("call fit() or load_state() first: the threshold is missing")
            y_pred = np.where(1.0 - score < self.threshold, self.num_known, closed)
        return Prediction(y_pred, closed, score)

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
