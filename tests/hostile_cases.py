"""Hostile and damaged inputs, grouped by surface, each with the outcome the lab must give.

Every case prepares its files in its own folder, runs one `dqlab` command in-process and is classified:
    clean         a one-line error on stderr naming the file or argument (exit 2), or the expected result (exit 0)
    traceback     an exception escaped the command
    unclear       exit 2, but the message does not name what it must (or is more than one line)
    silent-wrong  exit 0 where the input had to be refused
    security      a planted pickle ran, or a file outside $DQLAB_HOME and the named outputs changed
    data loss     an output folder or file left half-written, or an older model's parts kept in a new one

tests/test_hostile.py asserts every case is clean; scripts/hostile_report.py prints the table by surface.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Callable

import torch

SURFACES = ["model folders", "saved folders", "configs", "store", "outputs", "CLI arguments", "app"]
OUTCOMES = ["clean", "traceback", "unclear", "silent-wrong", "security", "data loss"]
SMALL_CALIB = ["--calib-samples", "2", "--calib-steps", "2", "--device", "cpu"]


@dataclasses.dataclass
class Case:
    surface: str
    name: str
    make: Callable  # (ctx, dir) -> argv for `dqlab`, after writing the case's files into dir
    needle: str | None = None  # None: the command must succeed; else its one-line error must contain this
    check: Callable | None = None  # (ctx, dir, result) -> (outcome, why) or None: security / data-loss checks
    outputs: tuple = ()  # names (relative to dir) the command may write; everything else in dir stays as it was
    run: Callable | None = None  # (ctx, dir) -> (outcome, why): a case that is not one dqlab command (the app)


@dataclasses.dataclass
class Result:
    case: Case
    outcome: str
    why: str
    rc: int | None
    err: str
    seconds: float


class Context:
    """Templates every case copies from: model folders, saved quantized folders, a reference image folder, a run
    store. Built once (about a minute on one CPU thread)."""

    def __init__(self, base: Path):
        from analysis.models.loading import BUNDLED

        self.base = Path(base)
        self.home = self.base / "home"
        self.victim = self.base / "victim"
        self.victim.mkdir(parents=True, exist_ok=True)
        (self.victim / "keep.txt").write_text("must survive")
        self.marker = self.base / "pickle-ran.txt"
        self.templates = self.base / "templates"
        self.templates.mkdir(exist_ok=True)
        self.dit = BUNDLED["bundled:dit-mnist"]
        self.unet = BUNDLED["bundled:unet-mnist"]
        self.tiny = self._tiny_pipeline()
        self.saved = self._saved("saved-w4a8", "ptq4dit", 4, 8)
        self.saved_w8 = self._saved("saved-w8a8", "baseline", 8, 8)
        self.uncond = self._uncond_unet()
        self.uncond_w8 = self._saved("uncond-w8a8", "baseline", 8, 8, source=self.uncond)
        self.reference = self._reference()

    def _tiny_pipeline(self) -> Path:
        from tests.conftest import save_pipeline_folder

        folder = self.templates / "tiny"
        if not folder.exists():
            save_pipeline_folder(folder, with_vae=True)
        return folder

    def _saved(self, name: str, method: str, w: int, a: int, source: Path | None = None) -> Path:
        from analysis.models.saved import save_quantized
        from analysis.quantization.calibration import CalibrationSpec
        from analysis.models.loading import load
        from analysis.quantization.pipeline import quantize_bundle
        from quant.api import QuantConfig

        folder = self.templates / name
        if not folder.exists():
            fp = load(str(source or self.tiny), device="cpu")
            variant = quantize_bundle(fp, QuantConfig(method=method, w_bits=w, a_bits=a, tpq=True),
                                      CalibrationSpec(images=2, steps=2))
            save_quantized(variant.bundle, variant.config, folder, base_source=str(source or self.tiny),
                           recipe=variant.recipe)
        return folder

    def _uncond_unet(self) -> Path:
        from diffusers import DDPMScheduler, UNet2DModel

        folder = self.templates / "uncond-unet"
        if not folder.exists():
            torch.manual_seed(0)
            UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=4,
                        layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D")).save_pretrained(folder / "unet")
            DDPMScheduler(num_train_timesteps=1000).save_pretrained(folder / "scheduler")
        return folder

    def _reference(self) -> Path:
        from PIL import Image

        folder = self.templates / "reference"
        if not folder.exists():
            folder.mkdir()
            gen = torch.Generator().manual_seed(0)
            for i in range(8):
                arr = (torch.rand(16, 16, generator=gen) * 255).to(torch.uint8).numpy()
                Image.fromarray(arr).convert("RGB").save(folder / f"{i}.png")
        return folder

    def copy(self, src: Path, dest: Path) -> Path:
        shutil.copytree(src, dest)
        return dest


# ---------------------------------------------------------------------------------------------------------
# Helpers that damage files
# ---------------------------------------------------------------------------------------------------------

def edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)  # edits in place
    path.write_text(json.dumps(data))


def resign(folder: Path) -> None:
    """Recompute a saved folder's checksum after an edit, as a hostile author would: the structural checks must
    then still refuse the folder on their own."""
    from quant.io import META, WEIGHTS, content_checksum

    meta = json.loads((folder / META).read_text())
    meta["checksum"] = content_checksum(folder / WEIGHTS, meta)
    (folder / META).write_text(json.dumps(meta))


def edit_tensors(path: Path, fn) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path))


def deep_json(depth: int) -> str:
    return "[" * depth + "]" * depth


def sample_argv(model, out="out.png", classes=True):
    return ["sample", "--model", str(model), "--seeds", "0", "--steps", "1", "--device", "cpu", "--out", out] + (
        ["--classes", "0"] if classes else [])


# ---------------------------------------------------------------------------------------------------------
# Model folders
# ---------------------------------------------------------------------------------------------------------

def _dit(ctx, d):
    return ctx.copy(ctx.dit, d / "m")


def _unet(ctx, d):
    return ctx.copy(ctx.unet, d / "m")


def _model_case(name, damage, needle, base=_dit):
    def make(ctx, d):
        m = base(ctx, d)
        damage(ctx, m)
        return sample_argv(m)
    return Case("model folders", name, make, needle, outputs=("out.png",))


def _swap_weights(ctx, m, other, sub, other_sub):
    shutil.copy(Path(other) / other_sub / "diffusion_pytorch_model.safetensors",
                m / sub / "diffusion_pytorch_model.safetensors")


def _drop_key(path):
    edit_tensors(path, lambda t: t.pop(sorted(t)[0]))


def _dit_in_unet(ctx, m):
    os.rename(m / "transformer", m / "unet")


MODEL_FOLDER_CASES = [
    _model_case("control: the bundled DiT folder as shipped loads and samples", lambda c, m: None, None),
    _model_case("control: the bundled UNet folder as shipped loads and samples", lambda c, m: None, None, base=_unet),
    _model_case("UNet weights under a DiT config", lambda c, m: _swap_weights(c, m, c.unet, "transformer", "unet"),
                "does not match its config"),
    _model_case("DiT weights under a UNet config", lambda c, m: _swap_weights(c, m, c.dit, "unet", "transformer"),
                "does not match its config", base=_unet),
    _model_case("a missing key", lambda c, m: _drop_key(m / "transformer" / "diffusion_pytorch_model.safetensors"),
                "1 missing"),
    _model_case("an unexpected key", lambda c, m: edit_tensors(m / "transformer" / "diffusion_pytorch_model.safetensors",
                                                               lambda t: t.update(extra=torch.zeros(2))),
                "1 unexpected"),
    _model_case("a mis-shaped weight", lambda c, m: edit_tensors(
        m / "transformer" / "diffusion_pytorch_model.safetensors",
        lambda t: t.update({"proj_out_2.bias": torch.zeros(3)})), "proj_out_2.bias has shape"),
    _model_case("an empty weights file",
                lambda c, m: (m / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b""),
                "diffusion_pytorch_model.safetensors"),
    _model_case("a truncated weights file", lambda c, m: _truncate(m / "transformer" / "diffusion_pytorch_model.safetensors"),
                "diffusion_pytorch_model.safetensors"),
    _model_case("random bytes as weights",
                lambda c, m: (m / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(os.urandom(4096)),
                "diffusion_pytorch_model.safetensors"),
    _model_case("a DiT folder in a unet/ subfolder", _dit_in_unet, "config.json describes a DiTTransformer2DModel"),
    _model_case("config.json is a list", lambda c, m: (m / "transformer" / "config.json").write_text("[1, 2]"),
                "config.json must hold an object"),
    _model_case("config.json is random bytes", lambda c, m: (m / "transformer" / "config.json").write_bytes(os.urandom(300)),
                "config.json"),
    _model_case("config.json nested 100,000 deep", lambda c, m: (m / "transformer" / "config.json").write_text(deep_json(100_000)),
                "config.json"),
    _model_case("config.json of 20 MB", lambda c, m: (m / "transformer" / "config.json").write_text(" " * (20 * 2 ** 20) + "{}"),
                "config.json is 20.0 MiB"),
    _model_case("num_layers -1", lambda c, m: edit_json(m / "transformer" / "config.json", lambda d: d.update(num_layers=-1)),
                "num_layers must be an integer"),
    _model_case("num_layers 100000", lambda c, m: edit_json(m / "transformer" / "config.json",
                                                            lambda d: d.update(num_layers=100_000)),
                "num_layers must be an integer"),
    _model_case("attention_head_dim 10^6", lambda c, m: edit_json(m / "transformer" / "config.json",
                                                                  lambda d: d.update(attention_head_dim=1_000_000)),
                "attention_head_dim"),
    _model_case("sample_size 10^5", lambda c, m: edit_json(m / "transformer" / "config.json",
                                                           lambda d: d.update(sample_size=100_000)), "sample_size"),
    _model_case("width x depth past the parameter bound", lambda c, m: edit_json(
        m / "transformer" / "config.json", lambda d: d.update(num_layers=128, num_attention_heads=128,
                                                              attention_head_dim=1024)), "parameters"),
    _model_case("num_embeds_ada_norm null", lambda c, m: edit_json(m / "transformer" / "config.json",
                                                                   lambda d: d.update(num_embeds_ada_norm=None)),
                "config.json"),
    _model_case("a string where a size belongs", lambda c, m: edit_json(m / "transformer" / "config.json",
                                                                        lambda d: d.update(patch_size="2")),
                "patch_size must be an integer"),
    _model_case("scheduler config with strings", lambda c, m: edit_json(
        m / "scheduler" / "scheduler_config.json", lambda d: d.update(num_train_timesteps="1000", beta_start="x")),
        "scheduler_config.json: num_train_timesteps"),
    _model_case("scheduler config is a list", lambda c, m: (m / "scheduler" / "scheduler_config.json").write_text("[]"),
                "scheduler_config.json must hold an object"),
    _model_case("bundle.json with a string guidance", lambda c, m: edit_json(m / "bundle.json",
                                                                             lambda d: d.update(default_guidance="4")),
                "bundle.json: default_guidance"),
    _model_case("bundle.json with guidance NaN", lambda c, m: (m / "bundle.json").write_text('{"eval_guidance": NaN}'),
                "bundle.json"),
    _model_case("a vae/ without safetensors weights", lambda c, m: (m / "vae").mkdir() or
                (m / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"})),
                "vae has no diffusion_pytorch_model.safetensors"),
    _model_case("pickle weights only (.bin)", lambda c, m: os.rename(
        m / "transformer" / "diffusion_pytorch_model.safetensors", m / "transformer" / "diffusion_pytorch_model.bin"),
        "safetensors weights only"),
    _model_case("a shard index pointing outside the folder", lambda c, m: (
        os.remove(m / "transformer" / "diffusion_pytorch_model.safetensors"),
        (m / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"x": "../../../victim/keep.txt"}}))), "not a plain name"),
    _model_case("NaN in a weight", lambda c, m: edit_tensors(
        m / "transformer" / "diffusion_pytorch_model.safetensors",
        lambda t: t["proj_out_2.bias"].fill_(float("nan"))), "NaN"),
    Case("model folders", "a folder that does not exist", lambda ctx, d: sample_argv(d / "nothing-here"), "does not exist"),
]


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# ---------------------------------------------------------------------------------------------------------
# Saved quantized folders
# ---------------------------------------------------------------------------------------------------------

def _saved_case(name, damage, needle, template="saved", signed=True):
    def make(ctx, d):
        m = ctx.copy(getattr(ctx, template), d / "q")
        damage(ctx, m)
        if signed:
            resign(m)
        return sample_argv(m)
    return Case("saved folders", name, make, needle, outputs=("out.png",))


def _meta(fn):
    return lambda ctx, m: edit_json(m / "quant_config.json", fn)


def _weights(fn):
    return lambda ctx, m: edit_tensors(m / "model.safetensors", fn)


def _first(t, suffix):
    return sorted(k for k in t if k.endswith(suffix))[0]


def _set_first(suffix, value):
    def fn(t):
        k = _first(t, suffix)
        t[k] = torch.full_like(t[k], value)
    return fn


SAVED_FOLDER_CASES = [
    _saved_case("control: the folder as saved loads and samples", lambda ctx, m: None, None, signed=False),
    _saved_case("control: a W8A8 folder as saved loads and samples", lambda ctx, m: None, None, template="saved_w8",
                signed=False),
    _saved_case("config says W4, tensors are W8", _meta(lambda d: d["config"].update(w_bits=4)),
                "stored at 8 bits", template="saved_w8"),
    _saved_case("config says A2, tensors are A8", _meta(lambda d: d["config"].update(a_bits=2)),
                "zero points must lie in", template="saved_w8"),
    _saved_case("packed bits 8 -> 4", _meta(lambda d: [v.update(bits=4) for v in d["packed"].values()]),
                "stored at 4 bits", template="saved_w8"),
    _saved_case("packed bits 8 -> 0", _meta(lambda d: [v.update(bits=0) for v in d["packed"].values()]),
                "stored at 0 bits", template="saved_w8"),
    _saved_case("symmetric flag flipped in the config", _meta(lambda d: d["config"].update(w_symmetric=True)),
                "symmetric"),
    _saved_case("symmetric flag flipped in the packed record",
                _meta(lambda d: [v.update(symmetric=True) for v in d["packed"].values()]), "symmetric"),
    _saved_case("an activation scale of 0", _weights(_set_first("to_q.act.scale", 0.0)),
                "step sizes must be finite and > 0"),
    _saved_case("a negative weight scale", _weights(_set_first("to_q.w_scale", -0.1)),
                "step sizes must be finite and > 0"),
    _saved_case("a NaN weight scale", _weights(_set_first("to_k.w_scale", float("nan"))),
                "step sizes must be finite and > 0"),
    _saved_case("a zero point off the integer grid", _weights(_set_first("to_v.w_zero", 3.5)), "integers"),
    _saved_case("a missing w_scale", _weights(lambda t: t.pop(_first(t, "to_q.w_scale"))), "missing"),
    _saved_case("a mis-shaped w_scale", _weights(lambda t: t.update({_first(t, "to_q.w_scale"): torch.ones(3, 1)})),
                "expected"),
    _saved_case("a short packed tensor", _weights(lambda t: t.update({_first(t, ".packed"): t[_first(t, ".packed")][:-1]})),
                ".packed"),
    _saved_case("a packed tensor of another dtype", _weights(lambda t: t.update(
        {_first(t, ".packed"): t[_first(t, ".packed")].to(torch.int32)})), ".packed"),
    _saved_case("NaN in a bias", _weights(_set_first("proj_out_2.bias", float("nan"))), "NaN"),
    _saved_case("a truncated weights file", lambda ctx, m: _truncate(m / "model.safetensors"), "model.safetensors"),
    _saved_case("random bytes as weights", lambda ctx, m: (m / "model.safetensors").write_bytes(os.urandom(5000)),
                "model.safetensors"),
    _saved_case("one weight byte flipped (checksum)", lambda ctx, m: _flip_byte(m / "model.safetensors"),
                "checksum", signed=False),
    _saved_case("a config field edited (checksum)", _meta(lambda d: d["config"].update(a_bits=4)), "checksum",
                signed=False),
    _saved_case("missing transformer_config", _meta(lambda d: d.pop("transformer_config")), "transformer_config"),
    _saved_case("missing bundle", _meta(lambda d: d.pop("bundle")), "bundle"),
    _saved_case("missing scheduler_config", _meta(lambda d: d.pop("scheduler_config")), "scheduler_config"),
    _saved_case("a huge latent shape", _meta(lambda d: d["bundle"].update(latent_shape=[4, 100_000, 100_000])),
                "latent_shape"),
    _saved_case("num_layers 100000 in transformer_config",
                _meta(lambda d: d["transformer_config"].update(num_layers=100_000)), "num_layers"),
    _saved_case("a wrong class count", _meta(lambda d: d["bundle"].update(num_classes=1000)), "num_classes"),
    _saved_case("quant_config.json nested 100,000 deep",
                lambda ctx, m: (m / "quant_config.json").write_text(deep_json(100_000)), "quant_config.json",
                signed=False),
    _saved_case("quant_config.json is a list", lambda ctx, m: (m / "quant_config.json").write_text("[]"),
                "must hold an object", signed=False),
    _saved_case("an unknown model class", _meta(lambda d: d.update(transformer_class="os.system")), "model class"),
    _saved_case("tpq_timesteps of strings", _meta(lambda d: d.update(tpq_timesteps=["a"])), "tpq_timesteps"),
    _saved_case("the VAE swapped for another", lambda ctx, m: edit_tensors(
        m / "vae" / "diffusion_pytorch_model.safetensors", lambda t: t.update({sorted(t)[0]: t[sorted(t)[0]] * 2})),
        "vae", signed=False),
]


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------

def _config_case(name, content, needle, extra=()):
    def make(ctx, d):
        path = d / "config.json"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content if isinstance(content, str) else json.dumps(content))
        return ["quantize", "--model", str(ctx.tiny), *SMALL_CALIB, "--config", str(path), *extra]
    return Case("configs", name, make, needle)


def _quant_flags_case(name, flags, needle, command="quantize"):
    def make(ctx, d):
        extra = SMALL_CALIB if command == "quantize" else ["--num-samples", "2", "--steps", "1", "--device", "cpu",
                                                          "--no-store"]
        return [command, "--model", str(ctx.tiny), *extra, *flags]
    return Case("configs", name, make, needle)


CONFIG_CASES = [
    _quant_flags_case("--exclude '*' quantizes nothing", ["--exclude", "*"], "quantizes no layer"),
    _quant_flags_case("--exclude '*' under eval", ["--method", "baseline", "--exclude", "*"], "quantizes no layer",
                      command="eval"),
    _config_case("layer_bits for a layer that does not exist", {"method": "baseline", "layer_bits": {"no.such": [8, 8]}},
                 "layer_bits pattern 'no.such' matches no layer"),
    _config_case("layer_bits with 9 bits", {"method": "baseline", "layer_bits": {"*": [9, 8]}}, "layer_bits"),
    _config_case("a flat option of another method", {"method": "ptq4dit", "alpha": 0.3},
                 "alpha is an option of smoothquant, not of ptq4dit"),
    _config_case("a string exclude", {"method": "baseline", "exclude": "transformer_blocks.0"},
                 "exclude must be a list"),
    _config_case("--w-bits beside --config", {"method": "baseline"}, "--w-bits is given beside --config",
                 extra=("--w-bits", "4")),
    _quant_flags_case("--method fp with --w-bits 4", ["--method", "fp", "--w-bits", "4"],
                      "--w-bits has no effect with --method fp", command="eval"),
    _quant_flags_case("--method fp with --tpq", ["--method", "fp", "--tpq"], "--tpq has no effect with --method fp",
                      command="eval"),
    _config_case("a list instead of an object", [1, 2], "must hold an object"),
    _config_case("nested 100,000 deep", deep_json(100_000), "nests deeper"),
    _config_case("an unknown field", {"method": "baseline", "w_bitz": 4}, "unknown QuantConfig field"),
    _config_case("bits as text", {"method": "baseline", "w_bits": "8"}, "w_bits must be"),
    _config_case("bits 3.5", {"method": "baseline", "w_bits": 3.5}, "w_bits must be"),
    _config_case("an unknown method", {"method": "gptq-remote"}, "unknown method"),
    _config_case("method null", {"method": None}, "unknown method"),
    _config_case("NaN percentile", '{"method": "baseline", "percentile": NaN}', "NaN"),
    _config_case("not UTF-8", b"\xff\xfe\x00garbage", "not UTF-8"),
    _config_case("options not an object", {"method": "smoothquant", "options": [0.5]}, "options must be"),
    Case("configs", "a config file that does not exist", lambda ctx, d: [
        "quantize", "--model", str(ctx.tiny), *SMALL_CALIB, "--config", str(d / "missing.json")], "missing.json"),
    Case("configs", "a folder as the config", lambda ctx, d: [
        "quantize", "--model", str(ctx.tiny), *SMALL_CALIB, "--config", str(d)], "not a file"),
]


# ---------------------------------------------------------------------------------------------------------
# The run store
# ---------------------------------------------------------------------------------------------------------

def _store_with_runs(home: Path, n: int = 2) -> list[int]:
    from analysis.evaluation.store import RunRecord, Store

    store = Store(home)
    return [store.add(RunRecord(model="m", method="fp", config={"method": "fp"}, num_samples=2, seeds=[0, 1],
                                labels=[0, 1], metrics={"fid": 1.0}, timings={"total": 1.0}, note=f"run {i}"),
                      files={"grid.png": b"png"}) for i in range(n)]


def _sql(home: Path, statement: str, *args) -> None:
    conn = sqlite3.connect(home / "runs.sqlite")
    conn.execute(statement, args)
    conn.commit()
    conn.close()


def _victim_intact(ctx, d, result):
    if not (ctx.victim / "keep.txt").is_file():
        return "security", "a folder outside the store was deleted"
    return None


def _store_case(name, damage, argv, needle, check=None):
    def make(ctx, d):
        damage(ctx, ctx.home)
        return argv(ctx)
    return Case("store", name, make, needle, check=check)


def _uid(value_fn):
    def damage(ctx, home):
        ids = _store_with_runs(home)
        _sql(home, "UPDATE runs SET uid = ? WHERE id = ?", value_fn(ctx), ids[0])
    return damage


STORE_CASES = [
    _store_case("uid ../../victim, runs --delete", _uid(lambda ctx: "../../victim"),
                lambda ctx: ["runs", "--delete", "1"], None, check=_victim_intact),
    _store_case("an absolute uid, runs --delete", _uid(lambda ctx: str(ctx.victim)),
                lambda ctx: ["runs", "--delete", "1"], None, check=_victim_intact),
    _store_case("a uid through a link out of the store", lambda ctx, home: (
        _uid(lambda c: "link")(ctx, home), os.symlink(ctx.victim, home / "runs" / "link")),
        lambda ctx: ["runs", "--delete", "1"], None, check=_victim_intact),
    _store_case("uid ../../victim, runs --show", _uid(lambda ctx: "../../victim"),
                lambda ctx: ["runs", "--show", "1"], "is not a plain name"),
    _store_case("a file name ../../victim/keep.txt, runs --show", lambda ctx, home: (
        _store_with_runs(home), _sql(home, "UPDATE runs SET files = ? WHERE id = 1", '["../../../victim/keep.txt"]')),
        lambda ctx: ["runs", "--show", "1"], "not a plain file name"),
    _store_case("random bytes as the database", lambda ctx, home: (home.mkdir(parents=True),
                                                                    (home / "runs.sqlite").write_bytes(os.urandom(8192))),
                lambda ctx: ["runs"], "runs.sqlite.damaged"),
    _store_case("a truncated database", lambda ctx, home: (_store_with_runs(home, 30),
                                                           _truncate(home / "runs.sqlite", 0.3)),
                lambda ctx: ["runs"], "runs.sqlite"),
    _store_case("a database of another schema", lambda ctx, home: (
        home.mkdir(parents=True), _sql(home, "CREATE TABLE runs (id INTEGER, name TEXT)")),
        lambda ctx: ["runs"], "lacks the column"),
    _store_case("a directory in place of the database", lambda ctx, home: (home / "runs.sqlite").mkdir(parents=True),
                lambda ctx: ["runs"], "it is not a file"),
    _store_case("one row of bad JSON: the others still listed", lambda ctx, home: (
        _store_with_runs(home), _sql(home, "UPDATE runs SET metrics = '{broken' WHERE id = 1")),
        lambda ctx: ["runs"], None, check=lambda ctx, d, r: None if "skipped run #1" in r.out and "1 run(s)" in r.out
        else ("unclear", "the bad row was not named, or the good one not listed")),
    _store_case("one row nested 100,000 deep", lambda ctx, home: (
        _store_with_runs(home), _sql(home, "UPDATE runs SET config = ? WHERE id = 2", deep_json(100_000))),
        lambda ctx: ["runs"], None, check=lambda ctx, d, r: None if "skipped run #2" in r.out
        else ("unclear", "the bad row was not named")),
    _store_case("a damaged database under eval", lambda ctx, home: (home.mkdir(parents=True),
                                                                     (home / "runs.sqlite").write_bytes(b"x" * 100)),
                lambda ctx: ["eval", "--model", str(ctx.tiny), "--num-samples", "2", "--steps", "1", "--device", "cpu"],
                "runs.sqlite"),
]


# ---------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------

def _quick(seconds: float):
    def check(ctx, d, result):
        if result.seconds > seconds:
            return "unclear", f"refused only after {result.seconds:.0f}s of work"
        return None
    return check


def _untouched(rel: str, content: str):
    def check(ctx, d, result):
        path = d / rel
        if not path.is_file() or path.read_text() != content:
            return "data loss", f"{rel} was changed or removed"
        return None
    return check


def _stale_vae_gone(ctx, d, result):
    from analysis.models.loading import load

    if (d / "q" / "vae" / "stale.txt").exists():
        return "data loss", "a stale vae/ of the older model survived"
    b = load(str(d / "q"), device="cpu")
    if b.vae is not None:
        return "data loss", "the new model loads with a VAE it never had"
    return None


def _write_foreign(d: Path) -> None:
    (d / "q").mkdir()
    (d / "q" / "thesis.txt").write_text("years of work")


OUTPUT_CASES = [
    Case("outputs", "--out under a file", lambda ctx, d: ((d / "afile").write_text("x"),
                                                         ["quantize", "--model", str(ctx.tiny), *SMALL_CALIB,
                                                          "--out", str(d / "afile" / "q")])[1],
         "is a file, not a folder", check=_quick(30)),
    Case("outputs", "--out a non-empty folder that is not a model", lambda ctx, d: (
        _write_foreign(d), ["quantize", "--model", str(ctx.tiny), *SMALL_CALIB, "--out", str(d / "q")])[1],
        "not a saved quantized model", check=_untouched("q/thesis.txt", "years of work")),
    Case("outputs", "--out a foreign folder with --force replaces it", lambda ctx, d: (
        _write_foreign(d), ["quantize", "--model", str(ctx.tiny), *SMALL_CALIB, "--method", "baseline",
                            "--out", str(d / "q"), "--force"])[1], None,
         check=lambda ctx, d, r: None if (d / "q" / "quant_config.json").is_file() and not (d / "q" / "thesis.txt").exists()
         else ("data loss", "the folder is not one complete model"), outputs=("q",)),
    Case("outputs", "re-saving a model without a VAE over one with a VAE", lambda ctx, d: (
        ctx.copy(ctx.saved, d / "q"), (d / "q" / "vae" / "stale.txt").write_text("old"),
        ["quantize", "--model", str(ctx.dit), *SMALL_CALIB, "--method", "baseline", "--out", str(d / "q")])[2],
        None, check=_stale_vae_gone, outputs=("q",)),
    Case("outputs", "sample --out names a folder", lambda ctx, d: ((d / "x.png").mkdir(),
                                                                   sample_argv(ctx.tiny, out=str(d / "x.png")))[1],
         "is a folder"),
    Case("outputs", "sample --out-dir names a file", lambda ctx, d: ((d / "f").write_text("x"), [
        "sample", "--model", str(ctx.tiny), "--seeds", "0", "--classes", "0", "--steps", "1", "--device", "cpu",
        "--out-dir", str(d / "f")])[1], "is a file"),
    Case("outputs", "sample --out under a file", lambda ctx, d: ((d / "f").write_text("x"),
                                                                 sample_argv(ctx.tiny, out=str(d / "f" / "g.png")))[1],
         "is a file, not a folder"),
    Case("outputs", "bench --markdown names a folder", lambda ctx, d: ((d / "t.md").mkdir(), [
        "bench", "--device", "cpu", "--shapes", "bundled", "--repeats", "1", "--markdown", str(d / "t.md")])[1],
        "is a folder", check=_quick(20)),
    Case("outputs", "sweep --config-out names a folder", lambda ctx, d: ((d / "c.json").mkdir(), [
        "sweep", "--model", str(ctx.tiny), "--device", "cpu", "--config-out", str(d / "c.json")])[1], "is a folder",
        check=_quick(20)),
    Case("outputs", "salience --out names a folder", lambda ctx, d: ((d / "s.npz").mkdir(), [
        "salience", "--model", str(ctx.tiny), "--device", "cpu", "--steps", "1", "--samples", "1",
        "--out", str(d / "s.npz")])[1], "is a folder", check=_quick(20)),
    Case("outputs", "sweep --config-out under a file", lambda ctx, d: ((d / "f").write_text("x"), [
        "sweep", "--model", str(ctx.tiny), "--device", "cpu", "--config-out", str(d / "f" / "c.json")])[1],
        "is a file, not a folder", check=_quick(20)),
]


# ---------------------------------------------------------------------------------------------------------
# CLI arguments
# ---------------------------------------------------------------------------------------------------------

def _arg_case(name, argv, needle, check=None):
    return Case("CLI arguments", name, lambda ctx, d: argv(ctx, d), needle, check=check, outputs=("o.png",))


def _note_stored(ctx, d, result):
    from analysis.evaluation.store import Store

    runs = Store(ctx.home).list()
    if not runs or runs[0].note != "kept":
        return "silent-wrong", "eval --note was not stored with the run"
    return None


ARG_CASES = [
    _arg_case("--device tpu", lambda ctx, d: sample_argv(ctx.tiny) + ["--device", "tpu"], "unknown device 'tpu'"),
    _arg_case("--dtype int8", lambda ctx, d: sample_argv(ctx.tiny) + ["--dtype", "int8"], "unknown dtype"),
    _arg_case("--seeds 0-100000000", lambda ctx, d: ["sample", "--model", str(ctx.tiny), "--seeds", "0-100000000",
                                                     "--device", "cpu"], "--seeds", check=_quick(20)),
    _arg_case("--seeds beyond 2^63", lambda ctx, d: ["sample", "--model", str(ctx.tiny), "--seeds", "9" * 30,
                                                     "--device", "cpu"], "--seeds"),
    _arg_case("--classes 0-99999999", lambda ctx, d: ["sample", "--model", str(ctx.tiny), "--classes", "0-99999999",
                                                      "--device", "cpu"], "--classes", check=_quick(20)),
    _arg_case("eval --num-samples 10^8", lambda ctx, d: ["eval", "--model", str(ctx.tiny), "--num-samples", "100000000",
                                                         "--device", "cpu", "--no-store", "--feature-extractor",
                                                         "digits"], "num_samples",
              check=_quick(20)),
    _arg_case("eval --seed -1", lambda ctx, d: ["eval", "--model", str(ctx.tiny), "--seed", "-1", "--no-store"],
              "--seed must be >= 0"),
    _arg_case("sweep --tolerance fid_vs_fp=inf", lambda ctx, d: ["sweep", "--model", str(ctx.tiny), "--tolerance",
                                                                 "fid_vs_fp=inf"], "finite"),
    _arg_case("sweep --tolerance rel_rms=nan", lambda ctx, d: ["sweep", "--model", str(ctx.tiny), "--tolerance",
                                                               "rel_rms=nan"], "finite"),
    _arg_case("sweep --seed -5", lambda ctx, d: ["sweep", "--model", str(ctx.tiny), "--seed", "-5"], ">= 0"),
    _arg_case("sensitivity at W16A16", lambda ctx, d: ["sensitivity", "--model", str(ctx.tiny), "--w-bits", "16",
                                                       "--a-bits", "16"], "quantizes nothing"),
    _arg_case("bench --xl2-blocks 0", lambda ctx, d: ["bench", "--device", "cpu", "--xl2-blocks", "0"], "xl2-blocks"),
    _arg_case("bench --xl2-blocks 10^6", lambda ctx, d: ["bench", "--device", "cpu", "--xl2-blocks", "1000000"],
              "xl2-blocks"),
    _arg_case("bench --xl2-batch 10^6", lambda ctx, d: ["bench", "--device", "cpu", "--xl2-batch", "1000000"],
              "xl2-batch"),
    _arg_case("--int8 on a W8A8 unconditional UNet", lambda ctx, d: [
        "sample", "--model", str(ctx.uncond_w8), "--seeds", "0", "--steps", "1", "--device", "cpu", "--int8",
        "--out", str(d / "o.png")], None),
    _arg_case("--int8 on an FP unconditional UNet", lambda ctx, d: [
        "sample", "--model", str(ctx.uncond), "--seeds", "0", "--steps", "1", "--device", "cpu", "--int8",
        "--out", str(d / "o.png")], "--int8"),
    _arg_case("--int8 on an FP model", lambda ctx, d: sample_argv(ctx.tiny, out=str(d / "o.png")) + ["--int8"],
              "--int8"),
    _arg_case("runs --limit 0", lambda ctx, d: ["runs", "--limit", "0"], "--limit"),
    _arg_case("--guidance nan", lambda ctx, d: sample_argv(ctx.tiny) + ["--guidance", "nan"], "--guidance"),
    _arg_case("--steps 0", lambda ctx, d: sample_argv(ctx.tiny) + ["--steps", "0"], "--steps"),
    _arg_case("eval --note is stored", lambda ctx, d: [
        "eval", "--model", str(ctx.tiny), "--num-samples", "2", "--steps", "1", "--device", "cpu",
        "--reference", str(ctx.reference), "--feature-extractor", "digits", "--note", "kept"], None,
        check=_note_stored),
]


def plant_effect(marker: str) -> str:
    """What a planted pickle does when it is unpickled: leave a marker file (the test looks for it)."""
    Path(marker).write_text("a planted pickle ran")
    return "features"


class _Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return plant_effect, (self.marker,)


def _plant_pickles(ctx, d) -> None:
    """A pickle at every cache path torch-fidelity (as the lab called it before) or the lab reads for this
    evaluation's reference: under $DQLAB_HOME and under the torch home."""
    from analysis.evaluation.metrics import DIGITS_EXTRACTOR, _extractor_tag, folder_reference

    key = f"{folder_reference(ctx.reference, size=(16, 16)).cache_name}-{_extractor_tag(DIGITS_EXTRACTOR)}"
    names = [f"{key}-{DIGITS_EXTRACTOR}-features-{layer}.pt" for layer in ("128", "logits")]
    names += [f"{key}-fid-features.pt", f"{key}-logits-fid-features.pt",
              f"{key}-{DIGITS_EXTRACTOR}-stat-fid-128.pt"]
    for root in (ctx.home / "fidelity_cache", ctx.base / "torch-home" / "fidelity_cache"):
        root.mkdir(parents=True, exist_ok=True)
        for name in names:
            torch.save(_Payload(ctx.marker), root / name)


def _pickle_case(name, flags):
    def make(ctx, d):
        ctx.marker.unlink(missing_ok=True)
        _plant_pickles(ctx, d)
        return ["eval", "--model", str(ctx.tiny), "--num-samples", "4", "--steps", "1", "--device", "cpu",
                "--reference", str(ctx.reference), "--feature-extractor", "digits", *flags]
    return Case("store", name, make, None,
                check=lambda ctx, d, r: ("security", "a planted pickle ran") if ctx.marker.exists() else None)


STORE_CASES += [
    _pickle_case("planted pickles in the metric caches: --kid --isc --prc",
                 ["--kid", "--kid-subset-size", "2", "--isc", "--prc"]),
    _pickle_case("planted pickles in the metric caches: --kid under --no-store",
                 ["--kid", "--kid-subset-size", "2", "--no-store"]),
]


# ---------------------------------------------------------------------------------------------------------
# The app (library calls the pages make; the page files themselves are covered by the AppTest suites)
# ---------------------------------------------------------------------------------------------------------

def _app_model_cache(ctx, d):
    """The model cache is bounded: with room for 2, a third model evicts the least recently used one, and the log
    the sidebar reads says which."""
    os.environ["DQLAB_MODEL_CACHE"] = "2"
    import importlib

    import pages._shared as shared

    shared = importlib.reload(shared)  # picks up the capacity
    shared.get_bundle.clear()  # models other tests loaded in this process would take the places counted here
    shared._model_cache_log.clear()
    try:
        keys = [(str(ctx.tiny), "cpu", "float32"), ("bundled:unet-mnist", "cpu", "float32"),
                (str(ctx.tiny), "cpu", "bfloat16")]
        log = shared._model_cache_log()
        for key in keys:
            shared.get_bundle(*key)
            log.touched(key)
        if log.evicted != [keys[0]]:
            return "unclear", f"expected the first model evicted, log says {log.evicted}"
        shared.get_bundle(*keys[0])  # evicted: loads again
        if log.reloads != 1 or keys[1] not in log.evicted:
            return "unclear", "the reload of an evicted model was not recorded"
        return "clean", ""
    finally:
        shared.get_bundle.clear()
        shared._model_cache_log.clear()
        os.environ.pop("DQLAB_MODEL_CACHE", None)
        importlib.reload(shared)


def _app_salience_isolated(ctx, d):
    """Salience collection on a session's view while another session samples the shared model at the same
    moment: neither sees the other's hooks, and both get what they get alone."""
    import threading

    from analysis.app_state import session_view
    from analysis.models.loading import load
    from analysis.salience.collect import SalienceConfig, collect
    from analysis.models.sampling import sample

    shared = load("bundled:dit-mnist", device="cpu")
    config = SalienceConfig(steps=3, samples=2, per_sample=False)
    alone = collect(session_view(shared), config)
    solo = sample(shared, [0, 1], [0, 1], steps=3).images
    got, errors = {}, []

    def other_session():
        try:
            for _ in range(3):
                got.setdefault("images", []).append(sample(shared, [0, 1], [0, 1], steps=3).images)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    thread = threading.Thread(target=other_session)
    thread.start()
    together = collect(session_view(shared), config)
    thread.join()
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in shared.denoiser.modules())
    if errors:
        return "traceback", f"the other session's sampling failed: {errors[0]!r}"
    if hooks:
        return "silent-wrong", f"{hooks} hooks left on the shared model"
    if not all(torch.equal(x, solo) for x in got["images"]):
        return "silent-wrong", "the other session's images changed while salience was collected"
    key = alone.layers[0]
    if not torch.equal(torch.as_tensor(alone.act_absmax[key]), torch.as_tensor(together.act_absmax[key])):
        return "silent-wrong", "collected statistics differ when another session samples"
    return "clean", ""


def _app_orphans_swept(ctx, d):
    """The app's store sweeps run folders orphaned by killed jobs (older than an hour) when it opens the store."""
    import pages._shared as shared

    home = d / "home"
    (home / "runs" / ".tmp-deadbeef").mkdir(parents=True)
    old = time.time() - 7200
    os.utime(home / "runs" / ".tmp-deadbeef", (old, old))
    (home / "runs" / "fresh").mkdir()  # a job committing right now: kept
    shared._store.clear()
    shared._store(str(home))
    left = sorted(p.name for p in (home / "runs").iterdir())
    return ("clean", "") if left == ["fresh"] else ("data loss", f"runs/ holds {left}")


APP_CASES = [
    Case("app", "model cache bounded, evictions recorded for the sidebar", None, run=_app_model_cache),
    Case("app", "salience on a session view while another session samples", None, run=_app_salience_isolated),
    Case("app", "orphaned run folders swept when the app opens the store", None, run=_app_orphans_swept),
]


ALL_CASES = MODEL_FOLDER_CASES + SAVED_FOLDER_CASES + CONFIG_CASES + STORE_CASES + OUTPUT_CASES + ARG_CASES + APP_CASES


# ---------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Run:
    rc: int | None
    out: str
    err: str
    exc: BaseException | None
    seconds: float


def _snapshot(root: Path, skip: list[Path]) -> dict:
    out = {}
    for path in root.rglob("*"):
        if any(path == s or s in path.parents for s in skip):
            continue
        try:
            st = path.lstat()
        except OSError:
            continue
        out[str(path)] = (st.st_size, st.st_mtime_ns) if path.is_file() else "dir"
    return out


def run_case(ctx: Context, case: Case, index: int) -> Result:
    """Run one case in its own folder and home; classify its outcome."""
    from analysis.cli import main

    d = ctx.base / "cases" / f"{index:03d}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    shutil.rmtree(ctx.home, ignore_errors=True)
    old_env = {k: os.environ.get(k) for k in ("DQLAB_HOME", "TORCH_HOME")}
    os.environ["DQLAB_HOME"] = str(ctx.home)
    os.environ["TORCH_HOME"] = str(ctx.base / "torch-home")
    cwd = os.getcwd()
    os.chdir(d)
    try:
        if case.run is not None:
            start = time.perf_counter()
            try:
                outcome, why = case.run(ctx, d)
            except Exception as exc:  # noqa: BLE001
                outcome, why = "traceback", f"{type(exc).__name__}: {exc}"
            return Result(case, outcome, why, None, "", time.perf_counter() - start)
        ctx.marker.unlink(missing_ok=True)
        if not (ctx.victim / "keep.txt").is_file():  # restored for the next case if an old version deleted it
            ctx.victim.mkdir(parents=True, exist_ok=True)
            (ctx.victim / "keep.txt").write_text("must survive")
        try:
            argv = [str(a) for a in case.make(ctx, d)]
        except Exception as exc:  # a broken case is the suite's bug: show it
            raise RuntimeError(f"case {case.name!r} could not be prepared: {exc}") from exc
        before = _snapshot(ctx.base, [ctx.home, ctx.base / "torch-home", *(d / o for o in case.outputs),
                                      d / "out.png"])
        out, err = io.StringIO(), io.StringIO()
        start = time.perf_counter()
        exc = None
        rc = None
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(argv)
            except SystemExit as e:
                rc = int(e.code or 0)
            except BaseException as e:  # noqa: BLE001 - an escaping exception is what the suite looks for
                exc = e
        run = _Run(rc, out.getvalue(), err.getvalue(), exc, time.perf_counter() - start)
        after = _snapshot(ctx.base, [ctx.home, ctx.base / "torch-home", *(d / o for o in case.outputs),
                                     d / "out.png"])
        outcome, why = _classify(case, run)
        touched = sorted(set(before) ^ set(after) | {k for k in before if k in after and before[k] != after[k]})
        if ctx.marker.exists():  # security outranks every other outcome
            outcome, why = "security", "a planted pickle ran"
        elif not (ctx.victim / "keep.txt").is_file():
            outcome, why = "security", "a folder outside the store was deleted"
        elif outcome == "clean" and touched:
            leftover = [t for t in touched if ".tmp-" in t]
            outcome, why = ("data loss", f"half-written file left: {leftover[0]}") if leftover else \
                ("security", f"a file outside the store and the named outputs changed: {touched[0]}")
        if outcome == "clean" and case.check is not None:
            got = case.check(ctx, d, run)
            if got is not None:
                outcome, why = got
        return Result(case, outcome, why, run.rc, run.err.strip()[-400:], run.seconds)
    finally:
        os.chdir(cwd)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _classify(case: Case, run: _Run) -> tuple[str, str]:
    if run.exc is not None:
        return "traceback", f"{type(run.exc).__name__}: {str(run.exc).splitlines()[0][:200] if str(run.exc) else ''}"
    if "Traceback" in run.err:
        return "traceback", run.err.strip().splitlines()[-1][:200]
    if case.needle is None:
        return ("clean", "") if run.rc == 0 else ("unclear", f"exit {run.rc}: {run.err.strip()[-200:]}")
    if run.rc == 0:
        return "silent-wrong", "accepted"
    lines = [line for line in run.err.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("dqlab")]
    if run.rc != 2 or len(errors) != 1:
        return "unclear", f"exit {run.rc}, {len(errors)} error lines: {run.err.strip()[-200:]}"
    if case.needle.lower() not in errors[0].lower():
        return "unclear", f"message lacks {case.needle!r}: {errors[0][:240]}"
    return "clean", ""


def table(results: list[Result], extra: list[Result] = ()) -> str:
    """The outcome counts by surface, as a markdown table."""
    rows = list(results) + list(extra)
    lines = ["| surface | cases | " + " | ".join(OUTCOMES) + " |", "|---|" + "---|" * (len(OUTCOMES) + 1)]
    for surface in SURFACES + ["all"]:
        got = [r for r in rows if surface == "all" or r.case.surface == surface]
        if not got:
            continue
        counts = [sum(r.outcome == o for r in got) for o in OUTCOMES]
        lines.append(f"| {surface} | {len(got)} | " + " | ".join(map(str, counts)) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Fuzz: random mutations of a valid saved folder and of configs, bounded in count and time
# ---------------------------------------------------------------------------------------------------------

FUZZ_VALUES = [None, -1, 0, 1, 3, 7, 16, 10 ** 9, 2 ** 63, -1e308, 1e308, 0.5, "", "x", "8", True, False, [], {},
               [4, 100_000, 100_000], {"a": [1]}, [[[[]]]]]
# Fields of the saved record a mutation aims at: each one must agree with the tensors or with the model's config.
SAVED_TARGETS = [("config", "w_bits"), ("config", "a_bits"), ("config", "attn_bits"), ("config", "w_symmetric"),
                 ("config", "a_symmetric"), ("config", "w_per_channel"), ("config", "tpq"), ("config", "exclude"),
                 ("config", "layer_bits"), ("config", "method"), ("transformer_class",), ("transformer_config",),
                 ("transformer_config", "num_layers"), ("transformer_config", "in_channels"),
                 ("transformer_config", "sample_size"), ("transformer_config", "num_attention_heads"),
                 ("transformer_config", "attention_head_dim"), ("transformer_config", "num_embeds_ada_norm"),
                 ("transformer_config", "patch_size"), ("transformer_config", "out_channels"), ("packed",),
                 ("tpq_timesteps",), ("bundle", "latent_shape"), ("bundle", "num_classes"), ("bundle",),
                 ("scheduler_config", "num_train_timesteps"), ("scheduler_config", "beta_schedule"),
                 ("scheduler_config",), ("format",), ("version",)]


def _outputs(bundle) -> torch.Tensor:
    """The denoiser's output on a fixed input: what a silent load would change."""
    from quant.denoiser import denoise

    c, h, w = bundle.latent_shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, c, h, w, generator=g)
    with torch.no_grad():
        return denoise(bundle.denoiser, x, torch.tensor([10, 500]), torch.tensor([0, 1]))


def _try_load(folder: Path, reference: torch.Tensor, ref_bundle, valid_edit: bool = False) -> tuple[str, str]:
    """refused | benign (loads and behaves exactly as the original) | silent-wrong | traceback. `valid_edit`: the
    mutation touched only sampling settings (scheduler, guidance), which a re-signed folder may change: a load that
    keeps the denoiser's outputs and quantization record is then benign."""
    from analysis.models.bundle import ModelLoadError
    from analysis.models.loading import load

    try:
        bundle = load(str(folder), device="cpu")
    except ModelLoadError as exc:
        msg = str(exc)
        if "\n" in msg.strip() or not msg:
            return "unclear", msg[:200]
        return "refused", msg[:160]
    except Exception as exc:  # noqa: BLE001 - what the fuzz looks for
        return "traceback", f"{type(exc).__name__}: {str(exc)[:200]}"
    try:
        same = (torch.equal(_outputs(bundle), reference) and bundle.latent_shape == ref_bundle.latent_shape
                and (valid_edit or bundle.scheduler_config == ref_bundle.scheduler_config)
                and bundle.num_classes == ref_bundle.num_classes and bundle.quant_config == ref_bundle.quant_config)
    except Exception as exc:  # noqa: BLE001 - it loaded, then failed: a silent load of a broken model
        return "silent-wrong", f"loaded, then {type(exc).__name__}: {str(exc)[:160]}"
    return ("benign", "") if same else ("silent-wrong", "loaded a model that behaves differently")


def _mutate_tensors(tensors: dict, rng) -> str:
    """One structural damage: a tensor dropped, shortened, lengthened, retyped or renamed, or a value no valid
    folder holds (a step size <= 0 or not finite, a zero point off its integer grid, a NaN weight). Changing a
    value to another valid one makes a different valid model, which no loader can tell apart: not tried."""
    names = sorted(tensors)
    name = names[int(rng.integers(len(names)))]
    t = tensors[name]
    kind = int(rng.integers(6))
    if kind == 0:
        del tensors[name]
        return f"drop {name}"
    if kind == 1 and t.numel() > 1:
        tensors[name] = t.reshape(-1)[:-1].clone()
        return f"shorten {name}"
    if kind == 2:
        tensors[name] = torch.cat([t.reshape(-1), t.reshape(-1)[:1]])
        return f"lengthen {name}"
    if kind == 3 and t.is_floating_point() and not name.endswith(".timesteps"):
        if name.endswith(("scale", ".w_scale")):
            choices = [0.0, -1.0, float("nan"), float("inf")]
        elif name.endswith(("zero", ".w_zero")):
            choices = [0.5, -1.0, 1e6, float("nan")]
        else:
            choices = [float("nan"), float("inf"), float("-inf")]
        value = choices[int(rng.integers(len(choices)))]
        flat = t.clone().reshape(-1)
        flat[int(rng.integers(flat.numel()))] = value
        tensors[name] = flat.reshape(t.shape)
        return f"set one value of {name} to {value}"
    if kind == 4:
        tensors[name] = t.to(torch.float16 if t.dtype != torch.float16 else torch.int32)
        return f"retype {name}"
    tensors[name + "x"] = tensors.pop(name)
    return f"rename {name}"


def _mutate_json(meta: dict, rng) -> str:
    path = SAVED_TARGETS[int(rng.integers(len(SAVED_TARGETS)))]
    parent = meta
    for key in path[:-1]:
        parent = parent.get(key) if isinstance(parent, dict) else None
    if not isinstance(parent, dict):
        return "no-op"
    if rng.random() < 0.2:
        parent.pop(path[-1], None)
        return f"delete {'.'.join(path)}"
    value = FUZZ_VALUES[int(rng.integers(len(FUZZ_VALUES)))]
    if path == ("packed",) and isinstance(parent.get("packed"), dict) and parent["packed"] and rng.random() < 0.7:
        entry = parent["packed"][sorted(parent["packed"])[int(rng.integers(len(parent["packed"])))]]
        field = ["bits", "symmetric", "shape"][int(rng.integers(3))]
        entry[field] = value
        return f"packed entry {field} = {value!r}"[:80]
    parent[path[-1]] = value
    return f"{'.'.join(path)} = {value!r}"[:80]


def fuzz_saved(ctx: Context, count: int = 120, seconds: float = 40.0, seed: int = 0) -> dict:
    """Random mutations of a valid saved folder, each loaded once: unsigned (random damage, the checksum stands)
    and re-signed (what a hostile author who recomputes the checksum can do: the structural checks alone must
    refuse it). Outcomes: refused / benign / silent-wrong / traceback / unclear, with examples of the bad ones."""
    import numpy as np
    from safetensors.torch import load_file, save_file

    from analysis.models.loading import load
    from quant.io import META, WEIGHTS

    rng = np.random.default_rng(seed)
    src = ctx.saved
    work = ctx.base / "fuzz-saved"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(src, work)
    meta_text, weight_bytes = (src / META).read_text(), (src / WEIGHTS).read_bytes()
    ref_bundle = load(str(src), device="cpu")
    reference = _outputs(ref_bundle)
    counts = {k: 0 for k in ("refused", "benign", "silent-wrong", "traceback", "unclear")}
    examples: list[str] = []
    start, tried = time.perf_counter(), 0
    while tried < count and time.perf_counter() - start < seconds:
        (work / META).write_text(meta_text)
        (work / WEIGHTS).write_bytes(weight_bytes)
        mode = ["bytes", "json-unsigned", "tensors-signed", "json-signed"][tried % 4]
        if mode == "bytes":
            data = bytearray(weight_bytes)
            for _ in range(int(rng.integers(1, 4))):
                data[int(rng.integers(len(data)))] ^= int(rng.integers(1, 256))
            if rng.random() < 0.3:
                data = data[: int(rng.integers(len(data)))]
            (work / WEIGHTS).write_bytes(bytes(data))
            what = "weight bytes flipped or cut"
        elif mode == "json-unsigned":
            text = bytearray(meta_text.encode())
            pos = int(rng.integers(len(text)))
            text[pos] = int(rng.choice(list(b'0123456789{}[]",:ae-')))
            (work / META).write_bytes(bytes(text))
            what = f"quant_config.json byte {pos} changed"
        elif mode == "tensors-signed":
            tensors = load_file(str(src / WEIGHTS))
            what = _mutate_tensors(tensors, rng)
            save_file(tensors, str(work / WEIGHTS))
            resign(work)
        else:
            meta = json.loads(meta_text)
            what = _mutate_json(meta, rng)
            (work / META).write_text(json.dumps(meta))
            resign(work)
        outcome, why = _try_load(work, reference, ref_bundle,
                                 valid_edit=mode == "json-signed" and what.startswith(("scheduler_config", "delete scheduler_config")))
        counts[outcome] += 1
        tried += 1
        if outcome in ("silent-wrong", "traceback", "unclear") and len(examples) < 10:
            examples.append(f"{mode}: {what} -> {outcome}: {why}")
    shutil.rmtree(work, ignore_errors=True)
    return {"tried": tried, "seconds": round(time.perf_counter() - start, 1), **counts, "examples": examples}


def _config_json_equal(a, b) -> bool:
    norm = lambda v: [norm(x) for x in v] if isinstance(v, (list, tuple)) else v  # noqa: E731
    return norm(a) == norm(b)


def fuzz_configs(count: int = 2000, seconds: float = 15.0, seed: int = 0) -> dict:
    """Random mutations of valid QuantConfig dicts (and of their JSON text), read as `dqlab quantize --config` reads
    them: each must be refused with a ValueError, or accepted holding exactly what the file says (no field dropped,
    split or coerced)."""
    import numpy as np

    from quant.config import QuantConfig
    from quant.methods import NAMES, all_options

    rng = np.random.default_rng(seed)
    bases = [QuantConfig(method=m).to_dict() for m in NAMES] + [
        QuantConfig(method="smoothquant", options={"alpha": 0.3}, exclude=["*.ff.net.2"], layer_bits={"*.to_q": [8, 8]},
                    tpq=True, attn_bits=8).to_dict()]
    fields = sorted({k for b in bases for k in b} | {o.name for o in all_options()} | {"unknown_field"})
    counts = {k: 0 for k in ("refused", "accepted", "silent-wrong", "traceback")}
    examples: list[str] = []
    start, tried = time.perf_counter(), 0
    while tried < count and time.perf_counter() - start < seconds:
        d = json.loads(json.dumps(bases[int(rng.integers(len(bases)))]))
        for _ in range(int(rng.integers(1, 4))):
            key = fields[int(rng.integers(len(fields)))]
            if rng.random() < 0.2:
                d.pop(key, None)
            else:
                d[key] = FUZZ_VALUES[int(rng.integers(len(FUZZ_VALUES)))]
        text = json.dumps(d)
        if tried % 5 == 4:  # damage the text itself
            raw = bytearray(text.encode())
            raw[int(rng.integers(len(raw)))] = int(rng.choice(list(b'0123456789{}[]",:ae-')))
            text = raw.decode("utf-8", "replace")
        tried += 1
        try:
            cfg = QuantConfig.from_json(text)
        except ValueError:
            counts["refused"] += 1
            continue
        except Exception as exc:  # noqa: BLE001
            counts["traceback"] += 1
            if len(examples) < 10:
                examples.append(f"{text[:120]} -> {type(exc).__name__}: {exc}")
            continue
        given = json.loads(text)
        got = cfg.to_dict()
        wrong = [k for k, v in given.items() if k in got and k != "options" and not _config_json_equal(got[k], v)]
        opts = given.get("options") or {}
        wrong += [f"options.{k}" for k, v in opts.items() if not _config_json_equal(got["options"].get(k, object()), v)]
        if wrong or QuantConfig.from_dict(got) != cfg:
            counts["silent-wrong"] += 1
            if len(examples) < 10:
                examples.append(f"{text[:160]} -> accepted with {wrong[:3]} different")
        else:
            counts["accepted"] += 1
    return {"tried": tried, "seconds": round(time.perf_counter() - start, 1), **counts, "examples": examples}
