import torch

from lstm_core.config import TrainConfig
from lstm_core.evaluate import confusion_matrix, evaluate, metrics_from_confusion


def test_confusion_matrix_counts_rows_as_truth():
    cm = confusion_matrix(torch.tensor([0, 0, 1, 2, 2, 2]), torch.tensor([0, 1, 1, 2, 2, 0]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_metrics_match_hand_computed_values():
    cm = torch.tensor([[1, 1, 0], [0, 1, 0], [1, 0, 2]])
    m = metrics_from_confusion(cm)
    assert abs(m["accuracy"] - 4 / 6) < 1e-12
    p = [1 / 2, 1 / 2, 1.0]
    r = [1 / 2, 1.0, 2 / 3]
    f1 = [2 * a * b / (a + b) for a, b in zip(p, r)]
    assert abs(m["macro_precision"] - sum(p) / 3) < 1e-12
    assert abs(m["macro_recall"] - sum(r) / 3) < 1e-12
    assert abs(m["macro_f1"] - sum(f1) / 3) < 1e-12
    assert [c["support"] for c in m["per_class"]] == [2, 1, 3]


def test_a_class_never_predicted_has_zero_precision_not_nan():
    m = metrics_from_confusion(torch.tensor([[2, 0], [1, 0]]))
    assert m["per_class"][1]["precision"] == 0.0 and m["per_class"][1]["f1"] == 0.0


class Fixed(torch.nn.Module):
    """Predicts the digit whose logit row we planted: a model with a known answer per sample."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.calls = []

    def forward(self, x):
        self.calls.append(len(x))
        start = sum(self.calls[:-1])
        return self.logits[start:start + len(x)]


def test_evaluate_counts_every_sample_including_the_last_partial_batch():
    n = 1037                                        # not a multiple of the batch size
    labels = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(0))
    pred = labels.clone()
    pred[::7] = (pred[::7] + 1) % 10                # every 7th sample wrong
    model = Fixed(torch.nn.functional.one_hot(pred, 10).float() * 5)
    result = evaluate(model, torch.zeros(n, 28, 28, dtype=torch.uint8), labels, TrainConfig(), batch_size=100)
    wrong = len(range(0, n, 7))
    assert model.calls == [100] * 10 + [37]
    assert result["n"] == n and abs(result["accuracy"] - (n - wrong) / n) < 1e-12
    assert sum(map(sum, result["confusion_matrix"])) == n
    assert [m["index"] for m in result["misclassified"]] == list(range(0, n, 7))
    assert all(m["pred"] == (m["true"] + 1) % 10 for m in result["misclassified"])
