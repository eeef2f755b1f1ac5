"""An example rtsc plugin: an online decoder whose decision value is the neurofeedback.

A linear classifier (scikit-learn's ``SGDClassifier``, hinge loss: a linear SVM fitted
by stochastic gradient descent, ``partial_fit`` one volume at a time) learns two classes
from the first ``train_volumes`` volumes of the run (the localizer), labelled from the
paradigm (``glm.events`` / ``glm.conditions``); on every later volume it publishes its
decision value, positive for the first class.

Labels: a volume acquired at ``t = index * TR`` seconds belongs to a condition when the
HRF-shifted block of one of its events covers it, ``onset + onset_delay_s <= t < onset +
duration + offset_delay_s`` (4 s and 6 s by default). With a single trial type in the
paradigm the classes are that trial type against ``rest``: a volume is rest when no
event is running or still in its response, ``t < onset`` or ``t >= onset + duration +
rest_after_s`` for every event (8 s by default). A volume covered by two conditions'
blocks, or in a transition (neither), is not used for training.

Features: the voxels of the automatic mask of the first volume
(``pipeline.mask_fraction``), each volume divided by its mean there (a global gain or
drift is not read as a class), standardized by each voxel's mean and standard deviation
over the localizer (Welford's running sums, updated volume by volume, fixed at its end).
A voxel outside this volume's field of view (NaN after motion correction) is at its
mean (0 standardized). At the end of the localizer the ``n_voxels`` voxels with the
largest Welch |t| between the two classes are kept (a whole-brain classifier learnt
from a few dozen volumes follows the motion residuals at the brain's edges: on the
simulator's default motion it was at chance), and the classifier learns the localizer's
labelled volumes in acquisition order on them: 20-45 ms, once, after the last localizer
volume's message is out (``StageResult.after_publish``), so no feedback waits for it.
The localizer's labelled volumes are kept until then (4 bytes per mask voxel each).

Fields (``volume`` message):

* ``plugin_decoder_value``: the decision value (SVM margin, unitless; > 0: the first
  class), None during the localizer;
* ``plugin_decoder_label``: the volume's label from the paradigm (a trial type,
  ``rest``, or None);
* ``plugin_decoder_trained``: localizer volumes learnt (0 until the localizer ends).

Summary: ``plugin_decoder`` (classes, volumes learnt, and the held-out accuracy: the
fraction of labelled volumes after the localizer on the right side of 0). Map:
``plugin_decoder_weights`` (the classifier's weights on the standardized voxels, 0
outside the voxels kept).

Use (``examples/`` on ``PYTHONPATH``, or installed as an ``rtsc.stages`` entry point)::

    pipeline:
      plugins: ["decoder_plugin:DecoderStage"]
      plugin_options: {"decoder_plugin:DecoderStage": {train_volumes: 60}}
    glm:
      events: events.tsv
      feedback: plugin
      feedback_plugin_field: plugin_decoder_value
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from sklearn.linear_model import SGDClassifier

from rtsc.pipeline.plugins import PluginContext, StageResult, Volume
from rtsc.pipeline.stages import automatic_mask

#: Options and their defaults.
DEFAULTS: dict[str, Any] = {
    "train_volumes": 60,     # the localizer: volumes 0 .. train_volumes - 1
    "classes": None,         # [positive, negative] labels; None: from the paradigm
    "onset_delay_s": 4.0,    # a block's label starts this long after its onset, s
    "offset_delay_s": 6.0,   # and ends this long after its offset, s
    "rest_after_s": 8.0,     # rest starts this long after an event's offset, s
    "n_voxels": 50,          # voxels kept, by the localizer's |t| between the classes
    "alpha": 1e-2,           # SGDClassifier's regularisation
    "seed": 0,               # SGDClassifier's random_state
}


def volume_label(t: float, events: tuple[tuple[float, float, str], ...], onset_delay_s: float,
                 offset_delay_s: float, rest_after_s: float) -> str | None:
    """The label of a volume acquired at ``t`` seconds (module docstring): a trial type,
    ``"rest"``, or None (a transition, or two conditions at once)."""
    covering = {kind for onset, duration, kind in events
                if onset + onset_delay_s <= t < onset + duration + offset_delay_s}
    if len(covering) == 1:
        return covering.pop()
    if covering:
        return None
    running = any(onset <= t < onset + duration + rest_after_s
                  for onset, duration, _ in events)
    return None if running else "rest"


class Welford:
    """Running mean and variance per voxel, (n_voxels,) float64."""

    def __init__(self, size: int) -> None:
        self.n = 0
        self.mean = np.zeros(size)
        self.m2 = np.zeros(size)

    def add(self, x: np.ndarray) -> None:
        self.n += 1
        delta = x - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (x - self.mean)

    @property
    def variance(self) -> np.ndarray:
        return self.m2 / max(self.n - 1, 1)


class DecoderStage:
    """Online two-class decoder on the motion-corrected volumes (module docstring).

    Parameters
    ----------
    options : dict, keys of :data:`DEFAULTS`
    context : PluginContext (the paradigm and the TR are needed)
    """

    name = "decoder"
    produces = frozenset({"plugin_decoder_value", "plugin_decoder_label",
                          "plugin_decoder_trained"})
    consumes = frozenset()
    consumes_optional = frozenset()

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """The options with their defaults; ValueError naming an unknown or bad one."""
        unknown = sorted(set(options) - set(DEFAULTS))
        if unknown:
            raise ValueError(f"unknown option {unknown[0]!r}; options: {', '.join(DEFAULTS)}")
        merged = {**DEFAULTS, **options}
        for key in ("train_volumes", "n_voxels"):
            if not isinstance(merged[key], int) or merged[key] < 2:
                raise ValueError(f"{key} {merged[key]!r}: an integer >= 2")
        classes = merged["classes"]
        if classes is not None and (not isinstance(classes, list) or len(classes) != 2
                                    or classes[0] == classes[1]):
            raise ValueError(f"classes {classes!r}: two different labels, or null")
        return merged

    def __init__(self, options: dict[str, Any], context: PluginContext) -> None:
        opts = self.check_options(options)
        if context.events is None or context.tr_s is None:
            raise ValueError("the decoder needs the paradigm (glm.events or glm.conditions) "
                             "and the TR")
        self.events = context.events
        self.tr_s = float(context.tr_s)
        self.train_volumes = int(opts["train_volumes"])
        self.n_voxels = int(opts["n_voxels"])
        self.delays = (float(opts["onset_delay_s"]), float(opts["offset_delay_s"]),
                       float(opts["rest_after_s"]))
        trial_types = sorted({kind for _, _, kind in self.events})
        classes = opts["classes"] or (trial_types[:2] if len(trial_types) >= 2
                                      else [trial_types[0], "rest"])
        self.classes: list[str] = [str(c) for c in classes]
        self.mask_fraction = context.config.pipeline.mask_fraction
        self.classifier = SGDClassifier(loss="hinge", alpha=float(opts["alpha"]),
                                        average=True, random_state=int(opts["seed"]))
        self.mask: np.ndarray | None = None
        self.all: Welford | None = None   # every localizer volume: the standardization
        self.by_class: list[Welford] = []  # the labelled ones, per class: the selection
        self.samples: list[tuple[np.ndarray, int]] = []  # (scaled voxels, class) to learn
        self.keep: np.ndarray | None = None  # the voxels kept, positions in the mask
        self.trained = 0
        self.test_hits = 0
        self.test_labelled = 0

    def _scaled(self, data: np.ndarray) -> np.ndarray:
        """The volume's in-mask voxels over their mean, (n_voxels,) float64; a voxel
        outside the field of view at its localizer mean."""
        if self.mask is None:
            self.mask = automatic_mask(np.nan_to_num(data, nan=0.0), self.mask_fraction) \
                & np.isfinite(data)
            size = int(self.mask.sum())
            self.all = Welford(size)
            self.by_class = [Welford(size), Welford(size)]
        assert self.all is not None
        x = data[self.mask].astype(np.float64)
        finite = np.isfinite(x)
        if finite.all():
            return x / x.mean()
        x = x / x[finite].mean() if finite.any() else np.ones_like(x)
        return np.where(finite, x, self.all.mean if self.all.n else 1.0)

    def _standardized(self, x: np.ndarray) -> np.ndarray:
        assert self.all is not None and self.keep is not None
        sd = np.sqrt(self.all.variance[self.keep])
        centred = x[self.keep] - self.all.mean[self.keep]
        return np.divide(centred, sd, out=np.zeros_like(centred), where=sd > 0)

    def _learn(self) -> None:
        """End of the localizer: keep the voxels of largest |t|, learn the samples."""
        a, b = self.by_class
        self.samples, samples = [], self.samples
        if min(a.n, b.n) < 2:
            return  # not both classes in the localizer: no decoder (values stay None)
        t = (a.mean - b.mean) / np.sqrt(a.variance / a.n + b.variance / b.n + 1e-30)
        k = min(self.n_voxels, t.size)
        self.keep = np.sort(np.argpartition(-np.abs(t), k - 1)[:k])
        # each class weighs as much as the other (rest blocks are shorter once the
        # transitions are left out): an unbalanced localizer biases the intercept
        weights = (a.n + b.n) / (2.0 * np.array([a.n, b.n]))
        for x, y in samples:
            self.classifier.partial_fit(self._standardized(x)[None, :], [y], classes=[0, 1],
                                        sample_weight=[weights[y]])
            self.trained += 1

    def update(self, volume: Volume, upstream: Mapping[str, Any] | None = None) -> StageResult:
        x = self._scaled(volume.data)
        label = volume_label(volume.index * self.tr_s, self.events, *self.delays)
        value = None
        learn = None
        if volume.index < self.train_volumes:
            assert self.all is not None
            self.all.add(x)
            if label in self.classes:
                y = self.classes.index(label)
                self.by_class[y].add(x)
                self.samples.append((x.astype(np.float32), y))
            if volume.index == self.train_volumes - 1:
                learn = self._learn  # once this volume's message is out
        else:
            if self.samples:  # the localizer's last volume was skipped (backlog)
                self._learn()
            if self.trained:
                # class 0 is the first label: a positive margin means the first class
                z = self._standardized(x)
                value = -float(self.classifier.decision_function(z[None, :])[0])
                if label in self.classes:
                    self.test_labelled += 1
                    self.test_hits += (value > 0) == (label == self.classes[0])
        return StageResult(metrics={"plugin_decoder_value": value,
                                    "plugin_decoder_label": label,
                                    "plugin_decoder_trained": self.trained},
                           after_publish=learn)

    def maps(self) -> dict[str, np.ndarray]:
        if self.mask is None or self.keep is None or not self.trained:
            return {}
        inside = np.zeros(int(self.mask.sum()), dtype=np.float32)
        inside[self.keep] = -self.classifier.coef_[0]
        weights = np.zeros(self.mask.shape, dtype=np.float32)
        weights[self.mask] = inside
        return {"plugin_decoder_weights": weights}

    def summary(self) -> dict[str, Any]:
        return {"plugin_decoder": {
            "classes": self.classes, "trained_volumes": self.trained,
            "voxels": 0 if self.keep is None else int(self.keep.size),
            "test_volumes": self.test_labelled,
            "test_accuracy": self.test_hits / self.test_labelled if self.test_labelled
            else None}}
