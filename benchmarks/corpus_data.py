"""Calibration and held-out inputs for the conformance corpus, real where the machine has them: crops of the
photographs scikit-image and scikit-learn ship (vision), text lines and pages rendered with the DejaVu and
Liberation fonts (OCR), a synthetic voiced/unvoiced signal run through the model's own state (voice activity),
token ids (language models), and random inputs shaped like the model's otherwise.

Every function → a list of feeds ``{input name: array with its batch axis (1)}`` that ONNX Runtime runs as is.
"""

from __future__ import annotations

import glob

import numpy as np
import onnx

WORDS = ("robot arm gripper camera sensor motor wheel battery 2024 x86 ARM edge int8 model speed 3.14 v1.2 "
         "Jetson Pi-5 [OK] error: 42% #7 line map (left) right/up <stop> go! Hello World quantize ONNX torch").split()


def fonts() -> list[str]:
    """The DejaVu and Liberation TrueType fonts installed here (regular sans, serif and mono faces)."""
    found = sorted(glob.glob("/usr/share/fonts/truetype/dejavu/DejaVu*.ttf")
                   + glob.glob("/usr/share/fonts/truetype/liberation/Liberation*.ttf"))
    return [f for f in found if "Math" not in f and "ExtraLight" not in f]


def text_lines(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(1, 4))) for _ in range(n)]


def _render(text: str, font_path: str, height: int, rng) -> np.ndarray:
    """One line of dark text on a light, slightly noisy background → HxWx3 uint8 cropped to the text."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(font_path, int(height * rng.uniform(0.55, 0.75)))
    left, top, right, bottom = font.getbbox(text)
    im = Image.new("RGB", (right - left + 8, height), tuple(int(v) for v in rng.integers(200, 256, 3)))
    ImageDraw.Draw(im).text((4 - left, (height - (bottom - top)) // 2 - top), text, font=font,
                            fill=tuple(int(v) for v in rng.integers(0, 70, 3)))
    a = np.asarray(im, np.float32) + rng.normal(0, 4, (height, im.width, 3))
    return np.clip(a, 0, 255).astype(np.uint8)


def ocr_lines(n: int, seed: int, height: int = 48, width: int = 320, flip_some: bool = False):
    """Rendered text lines resized as PP-OCR's recognizer/classifier take them (height 48, padded right to
    ``width``, (x/255 − 0.5)/0.5, RGB→BGR) → (feeds for input ``x``, the texts, which lines are upside down)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    faces, texts = fonts(), text_lines(n, seed)
    feeds, flipped = [], []
    for i, text in enumerate(texts):
        a = _render(text, faces[rng.integers(len(faces))], height, rng)
        w = min(width, int(np.ceil(height * a.shape[1] / a.shape[0])))
        a = np.asarray(Image.fromarray(a).resize((w, height), Image.BILINEAR), np.float32)
        flip = bool(flip_some and i % 2)
        if flip:
            a = a[::-1, ::-1]
        x = np.zeros((3, height, width), np.float32)
        x[:, :, :w] = (a[..., ::-1].transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
        feeds.append({"x": x[None]})
        flipped.append(flip)
    return feeds, texts, flipped


def ocr_pages(n: int, seed: int, size: int = 320) -> list[dict]:
    """Pages of 3–6 rendered lines at random places (the text detector's input, normalised (x/255 − 0.5)/0.5)."""
    rng = np.random.default_rng(seed)
    faces = fonts()
    out = []
    for _ in range(n):
        page = np.full((size, size, 3), rng.integers(190, 256), np.float32)
        for text in text_lines(int(rng.integers(3, 7)), int(rng.integers(1 << 30))):
            a = _render(text, faces[rng.integers(len(faces))], int(rng.integers(18, 40)), rng)[:, :size - 8]
            y, x = rng.integers(0, size - a.shape[0]), rng.integers(0, size - a.shape[1])
            page[y:y + a.shape[0], x:x + a.shape[1]] = a
        out.append({"x": ((page.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5).astype(np.float32)[None]})
    return out


def speech_like(seconds: float, seed: int, rate: int = 16000) -> np.ndarray:
    """A voiced/unvoiced synthetic signal: harmonic bursts with a moving pitch and two formant-like peaks,
    separated by noise-only gaps → float32 in [−1, 1]."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    sig = 0.01 * rng.standard_normal(len(t))
    pos = 0.0
    while pos < seconds:
        dur = rng.uniform(0.2, 0.8)
        on = (t >= pos) & (t < pos + dur)
        f0 = rng.uniform(90, 250) * (1 + 0.1 * np.sin(2 * np.pi * 3 * t[on]))
        phase = 2 * np.pi * np.cumsum(f0) / rate
        voiced = sum(np.sin(k * phase) / k * (1.5 if abs(k * 150 - 700) < 300 or abs(k * 150 - 1200) < 300 else 1)
                     for k in range(1, 12))
        sig[on] += 0.2 * voiced * np.hanning(on.sum())
        pos += dur + rng.uniform(0.1, 0.6)
    return np.clip(sig, -1, 1).astype(np.float32)


def vad_feeds(model: onnx.ModelProto, n: int, seed: int) -> list[dict]:
    """Consecutive 512-sample chunks of :func:`speech_like` audio, each with the recurrent state the fp32 model
    itself produced on the chunks before it (a model with a state input and output), so the state's range is
    the one it has in use."""
    import onnxruntime as ort

    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ins = {i.name: i for i in s.get_inputs()}
    chunk = next((d for d in ins["input"].shape[1:] if isinstance(d, int)), 512) if "input" in ins else 512
    audio = speech_like(n * chunk / 16000 + 0.1, seed)
    state_names = [k for k in ins if k not in ("input", "sr")]
    state = {k: np.zeros([d if isinstance(d, int) else 1 for d in ins[k].shape], np.float32) for k in state_names}
    outs = [o.name for o in s.get_outputs()]
    feeds = []
    for i in range(n):
        feed = {"input": audio[None, i * chunk:(i + 1) * chunk], **state}
        if "sr" in ins:
            feed["sr"] = np.array(16000, np.int64)
        feeds.append(feed)
        res = dict(zip(outs, s.run(None, feed)))
        new = [res[o] for o in outs if o not in ("output", "speech_probs")]
        state = dict(zip(state_names, new)) if len(new) == len(state_names) else state
    return feeds


def tokens(model: onnx.ModelProto, n: int, seed: int, vocab: int, seq: int = 32) -> list[dict]:
    """Token ids in [0, vocab), attention mask of ones, positions 0…seq−1; other inputs random."""
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(n):
        feed = {}
        for inp in model.graph.input:
            shape = [d.dim_value if d.HasField("dim_value") else (1 if i == 0 else seq)
                     for i, d in enumerate(inp.type.tensor_type.shape.dim)]
            if inp.name == "input_ids":
                feed[inp.name] = rng.integers(0, vocab, shape).astype(np.int64)
            elif inp.name == "position_ids":
                feed[inp.name] = np.arange(shape[-1], dtype=np.int64)[None]
            elif inp.type.tensor_type.elem_type == onnx.TensorProto.INT64:
                feed[inp.name] = np.ones(shape, np.int64)
            else:
                feed[inp.name] = rng.standard_normal(shape).astype(np.float32)
        feeds.append(feed)
    return feeds


def images(n: int, size: int, seed: int, norm: str = "imagenet", frames: int = 0) -> list[dict]:
    """Crops of the bundled photographs, ImageNet-normalised or RGB in 0–1; ``frames`` > 0: a clip (3, T, H, W)
    of one crop drifting sideways. Input name ``x`` (renamed by the caller)."""
    from zoo_models import MEAN, STD, crops

    x = crops(n, size + frames * 2 if frames else size, seed=seed)
    if norm == "unit":
        x = (x * STD + MEAN).astype(np.float32)
    if frames:
        x = np.stack([x[:, :, :size, 2 * t:2 * t + size] for t in range(frames)], axis=2)
    return [{"x": a[None]} for a in x]


def random_feeds(model: onnx.ModelProto, n: int, seed: int, shapes: dict | None = None,
                 ints: dict | None = None) -> list[dict]:
    """Inputs drawn like :func:`edgequant.bench.random_inputs` (free axes 1, or as ``shapes`` says; integer
    inputs as ``ints`` fixes them)."""
    rng = np.random.default_rng(seed)
    inits = {i.name for i in model.graph.initializer}
    feeds = []
    for _ in range(n):
        feed = {}
        for inp in model.graph.input:
            if inp.name in inits:
                continue
            t = inp.type.tensor_type
            shape = (shapes or {}).get(inp.name) or [d.dim_value if d.dim_value > 0 else 1 for d in t.shape.dim]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
            if inp.name in (ints or {}):
                feed[inp.name] = np.array(ints[inp.name], dtype)
            elif dtype == np.bool_:
                feed[inp.name] = rng.integers(0, 2, shape).astype(bool)
            elif dtype.kind in "iu":
                feed[inp.name] = rng.integers(0, 100, shape).astype(dtype)
            else:
                feed[inp.name] = rng.standard_normal(shape).astype(dtype)
        feeds.append(feed)
    return feeds
