"""GLUE SST-2 and MRPC: a frozen-feature probe (default) or mask-preserving fine-tuning.

Probe: the model is frozen; each example becomes one pooled feature vector (mean over tokens
for encoders, last non-pad token for decoders, mean encoder output for encoder-decoders); a
standardised logistic regression (L2 strength chosen by 5-fold cross-validation on the training
rows, never on dev) is trained on a seeded subsample of train and scored on dev.
It is fast and measures what the pruned representation still encodes, with no training noise
from the model itself.

Fine-tune: an HF *ForSequenceClassification of the same checkpoint trained end to end with
the pruning masks re-applied after every step (see `finetune.py`).

Train subsample: `--train-limit` (default 2000, 0 = all) rows drawn without replacement with
`seed`; dev: the first `--max-examples` rows (default all).
"""

from __future__ import annotations

import warnings

import numpy as np

from prunelab.data.glue import GlueSplit, read_glue
from prunelab.evaluation.common import (
    binomial_interval_data,
    encode_texts,
    new_result,
    pooled_features,
    require_tokenizer,
    text_max_length,
)
from prunelab.evaluation.types import EvalOptions, EvalResult
from prunelab.models.types import LoadedModel

DEFAULT_TRAIN_LIMIT = 2000
MAX_LENGTH = 128
PROBE_CS = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)  # inverse L2 strengths; one is picked by 5-fold CV on train


def _train_subset(train: GlueSplit, limit: int | None, seed: int) -> GlueSplit:
    limit = DEFAULT_TRAIN_LIMIT if limit is None else limit
    if limit <= 0 or limit >= len(train):
        return train
    rng = np.random.default_rng(seed)
    return train.subset(np.sort(rng.choice(len(train), size=limit, replace=False)))


def _metrics(task: str, labels: np.ndarray, preds: np.ndarray) -> dict[str, float | None]:
    from sklearn.metrics import accuracy_score, f1_score

    metrics: dict[str, float | None] = {"accuracy": float(accuracy_score(labels, preds))}
    if task == "mrpc":
        metrics["f1"] = float(f1_score(labels, preds, pos_label=1, zero_division=0))
    return metrics


def probe_predict(lm: LoadedModel, train: GlueSplit, dev: GlueSplit, seed: int, max_length: int) -> np.ndarray:
    """Fit a logistic-regression probe on frozen pooled features of `train`; predict `dev`."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    tok = lm.tokenizer
    x_train = pooled_features(lm, encode_texts(tok, train.texts_a, train.texts_b, max_length))
    x_dev = pooled_features(lm, encode_texts(tok, dev.texts_a, dev.texts_b, max_length))
    if not (np.isfinite(x_train).all() and np.isfinite(x_dev).all()):
        # A destroyed model can emit inf/nan features; score it as "predicts the majority class".
        majority = int(np.bincount(train.labels).argmax())
        return np.full(len(dev), majority, dtype=np.int64)
    folds = int(min(5, np.bincount(train.labels).min()))
    if folds < 2:
        from prunelab.errors import DataError

        raise DataError(f"{train.task} training subset has fewer than 2 examples of a class: raise --train-limit")
    clf = make_pipeline(
        StandardScaler(), LogisticRegressionCV(Cs=list(PROBE_CS), cv=folds, max_iter=2000, random_state=seed)
    )
    with warnings.catch_warnings():  # scikit-learn 1.8 announces LogisticRegressionCV default changes
        warnings.simplefilter("ignore", FutureWarning)
        clf.fit(x_train, train.labels)
    return clf.predict(x_dev)


def evaluate_glue(lm: LoadedModel, options: EvalOptions, task: str) -> EvalResult:
    """Accuracy (and F1 for MRPC) on GLUE dev, by probe or masked fine-tuning (higher is better)."""
    require_tokenizer(lm, task)
    train_full = read_glue(task, "train", options.data)
    dev = read_glue(task, "dev", options.data)
    if options.max_examples is not None:
        dev = dev.subset(range(min(len(dev), max(1, options.max_examples))))
    train = _train_subset(train_full, options.train_limit, options.seed)
    if len(set(train.labels.tolist())) < 2:
        from prunelab.errors import DataError

        raise DataError(f"{task} training subset has a single class: raise --train-limit (now {len(train)})")
    max_length = text_max_length(lm, MAX_LENGTH)
    details: dict[str, object] = {
        "mode": options.mode, "train_examples": len(train), "train_available": len(train_full),
        "train_sha256": train_full.sha256, "majority_baseline": float(max(dev.labels.mean(), 1 - dev.labels.mean())),
    }
    if options.mode == "finetune":
        from prunelab.evaluation.finetune import finetune_and_predict

        preds, report = finetune_and_predict(lm, train, dev, options, max_length=max_length)
        details.update(report)
        how = (f"full fine-tuning of {report['classifier_class']} ({report['steps']} steps, lr {options.finetune_lr}, "
               f"batch {report['batch_size']}) with pruning masks re-applied after every step; sparsity of prunable "
               f"matrices {report['sparsity_before']:.4f} before, {report['sparsity_after']:.4f} after")
    elif options.mode == "probe":
        preds = probe_predict(lm, train, dev, options.seed, max_length)
        pooling = {"encoder": "mean over tokens", "decoder": "last non-pad token",
                   "encoder-decoder": "mean encoder output"}[lm.family]
        how = f"frozen-feature probe: {pooling}, standardised logistic regression, C by 5-fold CV on train"
    else:
        from prunelab.errors import ConfigError

        raise ConfigError(f"unknown --mode '{options.mode}': use probe or finetune")
    metrics = _metrics(task, dev.labels, preds)
    details["interval_data"] = binomial_interval_data(dev.labels, preds)
    details["num_classes"] = 2  # SST-2 and MRPC are binary: chance is 1/2
    return new_result(
        lm, task, options, metrics=metrics, primary="accuracy", higher_is_better=True,
        note=f"GLUE {task.upper()} dev; {how}; trained on {len(train)} of {len(train_full)} train rows (seeded)",
        n_examples=len(dev), seqlen=max_length, data_path=dev.path, data_sha256=dev.sha256, details=details,
    )


def evaluate_sst2(lm: LoadedModel, options: EvalOptions) -> EvalResult:
    return evaluate_glue(lm, options, "sst2")


def evaluate_mrpc(lm: LoadedModel, options: EvalOptions) -> EvalResult:
    return evaluate_glue(lm, options, "mrpc")
