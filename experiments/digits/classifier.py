"""The judge: a digit classifier on 8x8 images, and the three metrics every row of the table reports.

The classifier is a one-hidden-layer perceptron (scikit-learn's ``MLPClassifier``) trained on the real
training split after the same 64x64 -> 8x8 round trip (``data.to_8x8``) that generated images go through.
Its weights are stored as plain arrays and applied here with numpy, so the features behind the Fréchet
distance are fixed and need no pickled estimator.

Metrics (inputs are 8x8 ink images in [0, 1]):

* conditional accuracy: the share of images the classifier labels as the digit that was asked for;
* Fréchet distance between Gaussians fitted to the classifier's hidden (ReLU) features of the generated
  images and of the real test images (FID's formula, in this fixed feature space);
* diversity: mean Euclidean distance between two different images of the same requested digit
  (8x8 pixels, so 0..8), averaged over the ten digits. Mode collapse drives it towards 0.
"""

import json
import warnings
from pathlib import Path

import numpy as np
import scipy.linalg

from experiments.digits import data as D

HIDDEN_UNITS = 128


class DigitClassifier:
    """``predict`` / ``features`` on 8x8 ink images, from stored weights."""

    def __init__(self, w1, b1, w2, b2):
        self.w1, self.b1, self.w2, self.b2 = (np.asarray(a, dtype=np.float64) for a in (w1, b1, w2, b2))

    @staticmethod
    def _flat(images8):
        images8 = np.asarray(images8, dtype=np.float64)
        return images8.reshape(len(images8), -1)

    def features(self, images8):
        """The hidden layer's ReLU activations, [N, HIDDEN_UNITS]."""
        return np.maximum(self._flat(images8) @ self.w1 + self.b1, 0.0)

    def logits(self, images8):
        return self.features(images8) @ self.w2 + self.b2

    def predict(self, images8):
        return self.logits(images8).argmax(axis=1)

    def accuracy(self, images8, labels):
        return float((self.predict(images8) == np.asarray(labels)).mean())

    def save(self, path):
        np.savez(path, w1=self.w1, b1=self.b1, w2=self.w2, b2=self.b2)

    @classmethod
    def load(cls, path):
        with np.load(path) as f:
            return cls(f["w1"], f["b1"], f["w2"], f["b2"])


def real_8x8_split():
    """The real train and test images after the 64x64 round trip: ``(train8, train_y, test8, test_y)``."""
    train_x, train_y, test_x, test_y = D.load_split()
    return D.to_8x8(D.upscale(train_x)), train_y, D.to_8x8(D.upscale(test_x)), test_y


def train_classifier(max_iter=500, seed=0):
    """Fit on the real training split; returns ``(DigitClassifier, test_accuracy)``."""
    from sklearn.neural_network import MLPClassifier

    train8, train_y, test8, test_y = real_8x8_split()
    mlp = MLPClassifier(hidden_layer_sizes=(HIDDEN_UNITS,), alpha=1e-3, max_iter=max_iter, random_state=seed)
    mlp.fit(train8.reshape(len(train8), -1), train_y)
    clf = DigitClassifier(mlp.coefs_[0], mlp.intercepts_[0], mlp.coefs_[1], mlp.intercepts_[1])
    sk_acc = mlp.score(test8.reshape(len(test8), -1), test_y)
    acc = clf.accuracy(test8, test_y)
    assert abs(acc - sk_acc) < 1e-9, (acc, sk_acc)  # the numpy forward pass is scikit-learn's
    return clf, acc


def train_and_save(out_dir, max_iter=500, seed=0):
    """Train, write ``classifier.npz`` and ``classifier.json`` (test accuracy) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clf, acc = train_classifier(max_iter=max_iter, seed=seed)
    clf.save(out_dir / "classifier.npz")
    _, _, test8, test_y = real_8x8_split()
    info = {"test_accuracy": acc, "test_images": int(len(test_y)), "hidden_units": HIDDEN_UNITS, "max_iter": max_iter,
            "seed": seed}
    (out_dir / "classifier.json").write_text(json.dumps(info, indent=2) + "\n")
    return clf, info


# --------------------------------------------------------------------------------------------- metrics


def gaussian_stats(features):
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), the Fréchet (2-Wasserstein) distance of two Gaussians."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "matrix is singular": handled below
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            # A singular product: nudge both covariances off singularity, as FID implementations do.
            eps = 1e-6 * np.eye(len(mu1))
            covmean = scipy.linalg.sqrtm((sigma1 + eps) @ (sigma2 + eps))
    covmean = np.real(covmean)  # sqrtm of a product of PSD matrices can carry tiny imaginary round-off
    return float(max(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean), 0.0))


def frechet_distance_features(features_a, features_b):
    return frechet_distance(*gaussian_stats(features_a), *gaussian_stats(features_b))


def frechet_bootstrap_sd(features, reference_features, n_boot=25, seed=0):
    """Standard deviation of the Fréchet distance over bootstrap resamples of both sets: how much of a
    difference between two rows is sampling noise."""
    rng = np.random.default_rng(seed)
    features, reference_features = np.asarray(features), np.asarray(reference_features)
    values = [frechet_distance_features(features[rng.integers(0, len(features), len(features))],
                                        reference_features[rng.integers(0, len(reference_features), len(reference_features))])
              for _ in range(n_boot)]
    return float(np.std(values, ddof=1))


def mean_pairwise_distance(images):
    """Mean Euclidean distance over all pairs of different images (0 for fewer than two images)."""
    x = np.asarray(images, dtype=np.float64).reshape(len(images), -1)
    n = len(x)
    if n < 2:
        return 0.0
    i, j = np.triu_indices(n, k=1)
    return float(np.linalg.norm(x[i] - x[j], axis=1).mean())  # exact differences: identical images give 0


def diversity(images8, labels):
    """Mean over digits of the mean pairwise distance between images of that digit."""
    images8, labels = np.asarray(images8), np.asarray(labels)
    return float(np.mean([mean_pairwise_distance(images8[labels == d]) for d in np.unique(labels)]))


def metrics(clf, images8, labels, reference_features):
    """The row's numbers: accuracy, Fréchet distance to ``reference_features``, diversity, per-digit accuracy."""
    labels = np.asarray(labels)
    pred = clf.predict(images8)
    return {
        "accuracy": float((pred == labels).mean()),
        "frechet": frechet_distance_features(clf.features(images8), reference_features),
        "diversity": diversity(images8, labels),
        "per_digit_accuracy": [float((pred[labels == d] == d).mean()) for d in range(10) if (labels == d).any()],
    }
