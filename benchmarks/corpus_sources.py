"""The conformance corpus's graphs, from independent sources installed here (nothing downloads at run time):

* ``torchvision`` — classification, detection (SSDLite head), segmentation and video models, random weights with
  BatchNorm statistics from natural crops (benchmarks/zoo_models.py; its ``torchvision::nms`` workaround);
* ``timm`` — one model of each family, ``pretrained=False``;
* ``ultralytics`` — YOLO v5u/v8/v11 detect, segment and pose built from their yaml (random weights rescaled as in
  benchmarks/yolo.py; offline);
* ``wheel`` — trained ONNX models shipped inside PyPI wheels, exported from other frameworks: PP-OCRv4 text
  detector and recognizer and the PP-OCR direction classifier (rapidocr-onnxruntime, PaddlePaddle → ONNX), Silero
  VAD (silero-vad; recurrent state, an If on the sample rate, several opsets);
* ``onnx-testdata`` — the model-zoo graphs the ``onnx`` wheel ships in onnx/backend/test/data/light (opset 9,
  constant weights);
* ``huggingface`` — tiny configurations with random weights (BERT, DistilBERT, GPT-2, Llama, ViT, CLIP, Whisper
  encoder) saved with ``save_pretrained`` and exported by optimum, offline;
* ``handmade`` — benchmarks/corpus_graphs.py.

:func:`graphs` → ``{name: Graph}``; ``Graph.make()`` → the fp32 ``onnx.ModelProto``; ``Graph.data(model, n, seed)``
→ feeds with their batch axis.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("YOLO_OFFLINE", "1")
for _k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_k, "1")

import corpus_data as cd  # noqa: E402
from corpus_graphs import GRAPHS  # noqa: E402


@dataclass(frozen=True)
class Graph:
    """One corpus entry: where it comes from, what task metric scores it, how to build it and its data."""

    name: str
    source: str
    task: str  # classify, segment, ssd, detect, pose, ctc, textmap, vad, embed, lm, generic
    make: Callable[[], onnx.ModelProto]
    data: Callable[[onnx.ModelProto, int, int], list]
    trained: bool = False
    meta: dict = field(default_factory=dict)


def _site(*parts: str) -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec(parts[0])
    return None if spec is None else Path(spec.origin).parent.joinpath(*parts[1:])


# ---------------------------------------------------------------- torch models → ONNX (edgequant's exporter)

def torch_to_onnx(module, example: dict[str, np.ndarray]) -> onnx.ModelProto:
    """nn.Module + one batch-1 feed → fp32 ONNX through edgequant's own exporter (dynamo, dynamic batch); where
    that fails, torch's TorchScript exporter at opset 17, so the peers still get a graph (the failure is
    recorded in the model's metadata as ``corpus.export_error``)."""
    import torch

    from edgequant.frontend.torch_export import to_onnx

    try:
        return to_onnx(module.eval(), {k: v[0] for k, v in example.items()}, opset=18)
    except Exception as exc:  # the error is a corpus finding, kept with the graph
        err = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        path = os.path.join(tmp, "m.onnx")
        torch.onnx.export(module.eval(), tuple(torch.from_numpy(v) for v in example.values()), path, dynamo=False,
                          opset_version=17, input_names=list(example), dynamic_axes={k: {0: "N"} for k in example})
        model = onnx.load(path)
    onnx.helper.set_model_props(model, {"corpus.export_error": err})
    return model


def _tv(name: str, size: int, frames: int = 0):
    def make():
        from zoo_models import _recalibrate_bn, import_torchvision, torchvision_model

        if name in ("lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", "ssdlite320_mobilenet_v3_large"):
            module = torchvision_model(name, size)
        else:
            import torch

            tv = import_torchvision()
            torch.manual_seed(0)
            family = tv.models.video if frames else tv.models
            module = getattr(family, name)(weights=None)
            calib = np.concatenate([f["x"] for f in cd.images(16, size, 100, frames=frames)])
            module = _recalibrate_bn(module, calib)
        return torch_to_onnx(module, cd.images(1, size, 0, frames=frames)[0])

    return make


def _timm(name: str, size: int):
    def make():
        import torch
        from zoo_models import _recalibrate_bn, import_torchvision

        import_torchvision()
        import timm

        torch.manual_seed(0)
        module = timm.create_model(name, pretrained=False)
        module = _recalibrate_bn(module, np.concatenate([f["x"] for f in cd.images(16, size, 100)]))
        return torch_to_onnx(module, cd.images(1, size, 0)[0])

    return make


def _yolo(yaml: str, size: int):
    def make():
        import torch
        from ultralytics.nn.tasks import guess_model_task, yaml_model_load
        from yolo import _unit_variance_init

        from ultralytics.nn import tasks

        kind = guess_model_task(yaml_model_load(yaml))
        cls = {"detect": tasks.DetectionModel, "segment": tasks.SegmentationModel, "pose": tasks.PoseModel}[kind]
        torch.manual_seed(0)
        m = cls(yaml, verbose=False).eval()
        for mod in m.modules():
            if hasattr(mod, "export"):
                mod.export = True
            if hasattr(mod, "format"):
                mod.format = "onnx"
        _unit_variance_init(m, m.model[-1])
        return torch_to_onnx(m, cd.images(1, size, 0, norm="unit")[0])

    return make


def _image_data(size: int, norm: str = "imagenet", frames: int = 0):
    def data(model: onnx.ModelProto, n: int, seed: int) -> list:
        inits = {i.name for i in model.graph.initializer}  # before IR 4 the weights are graph inputs too
        name = next(i.name for i in model.graph.input if i.name not in inits)
        return [{name: f["x"]} for f in cd.images(n, size, seed, norm=norm, frames=frames)]

    return data


# ---------------------------------------------------------------- ONNX files shipped in wheels

def _file(*parts: str):
    def make():
        path = _site(*parts)
        if path is None or not path.exists():
            raise FileNotFoundError(f"{'/'.join(parts)} is not installed (pip install -e .[zoo])")
        return onnx.load(str(path))

    return make


def _ocr_rec(model, n, seed):
    return cd.ocr_lines(n, seed)[0]


def _ocr_cls(model, n, seed):
    return cd.ocr_lines(n, seed, width=192, flip_some=True)[0]


def _ocr_det(model, n, seed):
    return cd.ocr_pages(n, seed)


def _vad(model, n, seed):
    return cd.vad_feeds(model, n, seed)


def _onnx_light(name: str):
    def make():
        path = _site("onnx", "backend", "test", "data", "light", f"light_{name}.onnx")
        return onnx.load(str(path))

    return make


# ---------------------------------------------------------------- Hugging Face tiny configs (optimum, offline)

def _hf(kind: str):
    def make():
        import torch
        from zoo_models import import_torchvision

        import_torchvision()  # transformers imports torchvision, whose PyPI build needs this with the CPU torch
        import transformers as tr
        from optimum.exporters.onnx import main_export

        torch.manual_seed(0)
        small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
        model, task, part = {
            "bert": lambda: (tr.BertModel(tr.BertConfig(vocab_size=1000, **small)), "feature-extraction", None),
            "distilbert": lambda: (tr.DistilBertModel(tr.DistilBertConfig(vocab_size=1000, dim=64, n_layers=2,
                                                                          n_heads=4, hidden_dim=128)),
                                   "feature-extraction", None),
            "gpt2": lambda: (tr.GPT2LMHeadModel(tr.GPT2Config(vocab_size=1000, n_embd=64, n_layer=2, n_head=4)),
                             "text-generation", None),
            "llama": lambda: (tr.LlamaForCausalLM(tr.LlamaConfig(vocab_size=1000, num_key_value_heads=2, **small)),
                              "text-generation", None),
            "vit": lambda: (tr.ViTForImageClassification(tr.ViTConfig(image_size=64, patch_size=8, num_labels=10,
                                                                      **small)), "image-classification", None),
            "clip": lambda: (tr.CLIPModel(tr.CLIPConfig(
                text_config=dict(vocab_size=1000, **small), vision_config=dict(image_size=64, patch_size=8, **small),
                projection_dim=32)), "zero-shot-image-classification", None),
            "whisper": lambda: (tr.WhisperForConditionalGeneration(tr.WhisperConfig(
                vocab_size=1000, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=80,
                max_source_positions=100, max_target_positions=64)), "automatic-speech-recognition",
                "encoder_model.onnx"),
        }[kind]()
        with tempfile.TemporaryDirectory() as tmp:
            model.eval().save_pretrained(tmp)
            if kind in ("gpt2", "llama", "bert", "distilbert", "clip"):
                _tokenizer(tmp)
            if kind in ("vit", "clip"):
                tr.ViTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(tmp)
            if kind == "whisper":
                tr.WhisperFeatureExtractor(feature_size=80).save_pretrained(tmp)
                _tokenizer(tmp)
            out = os.path.join(tmp, "onnx")
            main_export(tmp, output=out, task=task, opset=18, device="cpu", do_validation=False,
                        local_files_only=True, library_name="transformers", no_post_process=True,
                        **({"monolith": False} if part else {}))
            return onnx.load(os.path.join(out, part or "model.onnx"))

    return make


def _tokenizer(folder: str) -> None:
    """A word-level tokenizer over a 1000-word vocabulary, so optimum finds one (never used for the data)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(1000)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w1").save_pretrained(folder)
    cfg = Path(folder, "config.json")
    c = json.loads(cfg.read_text())
    c.setdefault("pad_token_id", 1)
    cfg.write_text(json.dumps(c))


def _hf_data(kind: str):
    def data(model, n, seed):
        if kind in ("vit",):
            return [{"pixel_values": f["x"]} for f in cd.images(n, 64, seed)]
        if kind == "whisper":
            rng = np.random.default_rng(seed)
            return [{"input_features": rng.standard_normal((1, 80, 200)).astype(np.float32) * 0.5} for _ in range(n)]
        feeds = cd.tokens(model, n, seed, 1000, seq=16)
        if kind == "clip":
            for f, img in zip(feeds, cd.images(n, 64, seed)):
                f["pixel_values"] = img["x"]
        return feeds

    return data


# ---------------------------------------------------------------- the registry

TV_CLASSIFY = ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
               "efficientnet_v2_s", "regnet_x_400mf", "regnet_y_400mf", "shufflenet_v2_x0_5", "squeezenet1_1",
               "mnasnet0_5", "googlenet", "densenet121", "convnext_tiny", "swin_t", "vit_b_16", "maxvit_t")
TV_VIDEO = ("r3d_18", "mc3_18", "r2plus1d_18", "s3d")
TIMM = ("convnext_atto", "efficientnet_b0", "mobilevit_xxs", "regnetx_002", "vit_tiny_patch16_224",
        "swin_tiny_patch4_window7_224", "efficientformer_l1", "mobilenetv3_small_050", "levit_128s",
        "edgenext_xx_small", "mobileone_s0", "fastvit_t8", "repvit_m0_9", "ghostnet_050", "efficientvit_b0",
        "mobilenetv4_conv_small")
YOLO = ("yolov5nu", "yolov8n", "yolo11n", "yolov8n-seg", "yolo11n-seg", "yolov8n-pose", "yolo11n-pose")
ONNX_LIGHT = ("bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50", "shufflenet", "squeezenet",
              "vgg19", "zfnet512")
SILERO = ("silero_vad", "silero_vad_16k_op15", "silero_vad_op18_ifless", "silero_vad_half", "silero_vad_16k_sequence",
          "silero_vad_openvino_16k")
HANDMADE_DATA = {"unknown_rank": ({"x": [1, 3, 4, 4]}, None), "loop_recurrent": (None, {"steps": 3}),
                 "if_subgraph": (None, {"flag": True}), "gru_state": ({"x": [20, 1, 8], "h0": [1, 1, 16]}, None),
                 "batch_axis_1": ({"x": [16, 1, 32]}, None)}


def _silero_data(name):
    if name == "silero_vad_16k_sequence":  # (chunks, 576) frames with h/c state: random frames of the audio
        def data(model, n, seed):
            audio = cd.speech_like(n * 0.04 + 0.1, seed)
            return [{"input": np.stack([audio[i * 640 + k * 64:i * 640 + k * 64 + 576] for k in range(1)]),
                     "h": np.zeros((1, 1, 128), np.float32), "c": np.zeros((1, 1, 128), np.float32)}
                    for i in range(n)]
        return data
    return _vad


def graphs() -> dict[str, Graph]:
    """name → Graph, in the order the corpus runs them (quick ones first)."""
    out: list[Graph] = []
    for name, (build, _opset) in GRAPHS.items():
        shapes, ints = HANDMADE_DATA.get(name, (None, None))
        out.append(Graph(f"hand/{name}", "handmade", "generic", build,
                         lambda m, n, s, sh=shapes, i=ints: cd.random_feeds(m, n, s, sh, i)))
    rapid = "rapidocr_onnxruntime"
    out += [Graph("wheel/ppocrv4_rec", "wheel", "ctc", _file(rapid, "models", "ch_PP-OCRv4_rec_infer.onnx"), _ocr_rec,
                  trained=True),
            Graph("wheel/ppocrv4_det", "wheel", "textmap", _file(rapid, "models", "ch_PP-OCRv4_det_infer.onnx"),
                  _ocr_det, trained=True),
            Graph("wheel/ppocr_cls", "wheel", "classify", _file(rapid, "models", "ch_ppocr_mobile_v2.0_cls_infer.onnx"),
                  _ocr_cls, trained=True)]
    out += [Graph(f"wheel/{s}", "wheel", "vad", _file("silero_vad", "data", f"{s}.onnx"), _silero_data(s),
                  trained=True) for s in SILERO]
    out += [Graph(f"onnx/{n}", "onnx-testdata", "classify", _onnx_light(n), _image_data(224)) for n in ONNX_LIGHT]
    out += [Graph(f"hf/{k}", "huggingface", {"gpt2": "lm", "llama": "lm", "vit": "classify"}.get(k, "embed"),
                  _hf(k), _hf_data(k)) for k in ("bert", "distilbert", "gpt2", "llama", "vit", "clip", "whisper")]
    out += [Graph(f"tv/{n}", "torchvision", "classify", _tv(n, 224), _image_data(224)) for n in TV_CLASSIFY]
    out += [Graph("tv/lraspp_mobilenet_v3_large", "torchvision", "segment", _tv("lraspp_mobilenet_v3_large", 224),
                  _image_data(224)),
            Graph("tv/deeplabv3_mobilenet_v3_large", "torchvision", "segment",
                  _tv("deeplabv3_mobilenet_v3_large", 224), _image_data(224)),
            Graph("tv/ssdlite320_mobilenet_v3_large", "torchvision", "ssd", _tv("ssdlite320_mobilenet_v3_large", 320),
                  _image_data(320))]
    out += [Graph(f"tv/{n}", "torchvision", "classify", _tv(n, 112, frames=8), _image_data(112, frames=8))
            for n in TV_VIDEO]
    out += [Graph(f"timm/{n}", "timm", "classify", _timm(n, 224), _image_data(224)) for n in TIMM]
    out += [Graph(f"yolo/{y}", "ultralytics", "pose" if "pose" in y else "detect", _yolo(f"{y}.yaml", 320),
                  _image_data(320, norm="unit"), meta={"nc": 1 if "pose" in y else 80}) for y in YOLO]
    return {g.name: g for g in out}


def describe(g: Graph) -> dict[str, Any]:
    return {"name": g.name, "source": g.source, "task": g.task, "trained": g.trained}
