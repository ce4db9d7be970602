import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import tiny_config
from lstm_core.config import NO_AUGMENTATION, TrainConfig
from lstm_core.models import build_model
from lstm_core.preprocess import from_canvas, from_upload, mnist_like, predict
from lstm_core.train import Callback, fit


def canvas_with(box: tuple[int, int, int, int], size: int = 280) -> np.ndarray:
    """An RGBA canvas (white strokes on black) with a filled white rectangle (top, left, height, width)."""
    rgba = np.zeros((size, size, 4), np.uint8)
    top, left, h, w = box
    rgba[top:top + h, left:left + w] = 255
    return rgba


def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def center_of_mass(img: torch.Tensor) -> tuple[float, float]:
    ys, xs = torch.arange(28.0), torch.arange(28.0)
    total = img.sum()
    return float((img.sum(1) * ys).sum() / total), float((img.sum(0) * xs).sum() / total)


def bbox(img: torch.Tensor, threshold: float = 0.05) -> tuple[int, int]:
    mask = img > threshold
    rows, cols = mask.any(1).nonzero().squeeze(1), mask.any(0).nonzero().squeeze(1)
    return int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


def test_an_off_centre_blob_is_scaled_to_20_pixels_and_centred_by_mass():
    digit = from_canvas(canvas_with((10, 190, 60, 60)))
    assert not digit.empty
    cy, cx = center_of_mass(digit.image)
    assert abs(cy - 14) <= 0.6 and abs(cx - 14) <= 0.6
    assert max(bbox(digit.image)) in (20, 21)                       # 20 plus anti-aliased edge


def test_aspect_ratio_is_kept():
    h, w = bbox(from_canvas(canvas_with((20, 100, 200, 40))).image)
    assert h in (20, 21) and 4 <= w <= 6                              # 200x40 -> 20x4


def test_dark_ink_on_light_paper_is_inverted_to_match_mnist():
    light_on_dark = np.zeros((200, 150), np.uint8)
    light_on_dark[40:160, 60:90] = 255
    dark_on_light = 255 - light_on_dark
    a, b = from_upload(png(light_on_dark)), from_upload(png(dark_on_light))
    assert not a.inverted and b.inverted
    assert torch.allclose(a.image, b.image, atol=1e-5)
    rgb_photo = np.stack([dark_on_light] * 3, -1)                    # colour files too
    assert torch.allclose(from_upload(png(rgb_photo)).image, a.image, atol=1e-5)


def test_transparent_png_with_dark_ink_reads_as_ink():
    rgba = np.zeros((100, 100, 4), np.uint8)
    rgba[20:80, 45:55] = (0, 0, 0, 255)                               # black strokes, transparent paper
    digit = from_upload(png(rgba))
    assert not digit.empty and digit.inverted


@pytest.mark.parametrize("pixels", [np.zeros((280, 280, 4), np.uint8), np.full((50, 50), 255, np.uint8),
                                    np.full((50, 50), 128, np.uint8)])
def test_empty_drawings_and_blank_images_are_empty(pixels):
    digit = from_canvas(pixels) if pixels.ndim == 3 else from_upload(png(pixels))
    assert digit.empty and digit.image.sum() == 0
    assert from_canvas(None).empty and mnist_like(np.zeros((0, 0), np.float32)).empty


def test_huge_images_within_the_limit_still_work():
    big = np.full((3000, 4000), 255, np.uint8)
    big[1000:2000, 1900:2100] = 0
    digit = from_upload(png(big))
    assert digit.inverted and max(bbox(digit.image)) in (20, 21)


class Grab(Callback):
    def on_run_end(self, state, history):
        self.model = state.model.eval()


@pytest.fixture(scope="module")
def trained(mnist):
    grab = Grab()
    config = TrainConfig(limit_train=20000, val_size=1000, epochs=2, **NO_AUGMENTATION)
    fit(config, [grab], data=mnist)
    return grab.model, config


@pytest.mark.slow
def test_blown_up_mnist_digits_keep_their_accuracy(trained, mnist):
    """Real test digits drawn large at another place on a 280x280 canvas read as well as the originals."""
    model, config = trained
    n = 1500
    images, labels = mnist.test_images[:n].float() / 255, mnist.test_labels[:n]
    with torch.no_grad():
        plain = (model((images - 0.1307) / 0.3081).argmax(1) == labels).float().mean().item()
    gen = torch.Generator().manual_seed(0)
    correct = 0
    for i in range(n):
        side = int(torch.randint(120, 261, (1,), generator=gen))
        up = F.interpolate(images[i][None, None], size=(side, side), mode="bilinear", align_corners=False)[0, 0]
        top, left = (int(v) for v in torch.randint(0, 281 - side, (2,), generator=gen))
        canvas = np.zeros((280, 280, 4), np.uint8)
        canvas[top:top + side, left:left + side, :3] = (up.clamp(0, 1) * 255).to(torch.uint8).numpy()[..., None]
        canvas[..., 3] = 255
        correct += predict(model, config, from_canvas(canvas), details=False).digit == int(labels[i])
    assert plain > 0.9
    assert correct / n >= plain - 0.01


def test_prediction_details_for_unidirectional_and_bidirectional_models(mnist, trained):
    model, config = trained
    digit = from_canvas(canvas_with((50, 120, 180, 30)))             # a "1"
    result = predict(model, config, digit)
    assert len(result.probabilities) == 10 and abs(sum(result.probabilities) - 1) < 1e-4
    assert result.digit == int(np.argmax(result.probabilities)) and result.confidence == max(result.probabilities)
    assert len(result.steps) == 28 and all(abs(sum(row) - 1) < 1e-4 for row in result.steps)
    assert np.allclose(result.steps[-1], result.probabilities, atol=1e-5)     # the last row is the answer
    assert len(result.hidden) == 28 and len(result.hidden[0]) == config.hidden_size
    bi = tiny_config(bidirectional=True)
    bi_result = predict(build_model(bi).eval(), bi, digit)
    assert bi_result.steps is None and len(bi_result.hidden[0]) == 2 * bi.hidden_size
    cnn = tiny_config(arch="cnn")
    assert predict(build_model(cnn).eval(), cnn, digit).hidden is None


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn", "irnn"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_prediction_details_hold_the_last_layers_gates(cell, bidirectional):
    torch.manual_seed(0)
    config = tiny_config(cell=cell, bidirectional=bidirectional, num_layers=2)
    model = build_model(config).eval()
    digit = from_canvas(canvas_with((50, 120, 180, 30)))
    result = predict(model, config, digit, gates=True)
    assert predict(model, config, digit, details=False, gates=True).gates is None
    assert predict(model, config, digit).gates is None                   # only when asked: they cost a stroke time
    if cell in ("rnn", "irnn"):
        assert result.gates is None and len(result.hidden) == 28     # no gates, the rest of the details
        return
    lstm_names, gru_names = ["input gate", "forget gate", "output gate", "cell state"], ["reset gate", "update gate"]
    assert list(result.gates) == (lstm_names if cell == "lstm" else gru_names)
    width = config.hidden_size * (2 if bidirectional else 1)
    for name, values in result.gates.items():
        array = np.asarray(values)
        assert array.shape == (28, width)
        if name != "cell state":
            assert ((0 < array) & (array < 1)).all()
    if cell == "lstm":         # the hidden state shown beside them is what they make: h_t = o_t * tanh(c_t)
        gates = {name: np.asarray(values) for name, values in result.gates.items()}
        assert np.allclose(gates["output gate"] * np.tanh(gates["cell state"]), result.hidden, atol=1e-5)


def test_a_cnn_has_no_gates():
    cnn = tiny_config(arch="cnn")
    assert predict(build_model(cnn).eval(), cnn, from_canvas(canvas_with((50, 120, 180, 30))), gates=True).gates is None
