"""Weight files and run folders are untrusted input: every reader refuses a bad one in one line naming it.

Covers the init checkpoint (text, YAML, a folder, broken safetensors headers, non-tensor entries, shapes and
number kinds that do not fit), tokenizer and classifier metadata read beside weights, and `python -m src.export`:
it never takes a pickle permission from the run folder, and it passes over an unreadable newest checkpoint.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import pytest
import torch
from conftest import TINY, compose_config
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file, save_file

import src.encoders  # noqa: F401  (registers the encoder families)
from src.config import ConfigError
from src.encoders import create_encoder
from src.encoders.loading import InitCheckpoint, load_encoder_weights, read_checkpoint
from src.export import main
from src.files import load_state_dict_file, save_png, save_weights
from src.methods.mae import MAE
from src.methods.teacher import ClassifierRecord, InputSpec
from src.pipeline.export import export_run, pickle_allowed
from src.pipeline.fit import prepare
from src.pipeline.run_folder import CONFIG_FILE, LAST, PREVIOUS, config_text
from src.tokenizers import load_tokenizer, save_tokenizer, tokenizer_spec
from src.tokenizers.vq import VQTokenizer

MAE_LIGHT = ["objective.decoder_dim=32", "objective.decoder_depth=1", "objective.decoder_heads=2", "knn=null"]


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


class Payload:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


# ---- the init checkpoint -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "content", "said"),
    [
        ("notes.txt", b"just some notes\n", "starts with b'just some no'"),
        ("config.yaml", b"encoder:\n  arch: vit\n", "starts with b'encoder:\\n  a'"),
        ("empty.pth", b"", "it is empty"),
    ],
)
def test_init_checkpoint_that_is_no_weight_file_is_named(tmp_path: Path, name: str, content: bytes, said: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ConfigError) as e:
        read_checkpoint(path, "auto")
    message = one_line(e)
    assert f"init.checkpoint={path} is not a weight file" in message and said in message
    assert "accepted: .safetensors, or a torch file" in message


def test_init_checkpoint_folder_or_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"is a directory, not a weight file \(accepted: \.safetensors"):
        read_checkpoint(tmp_path, "auto")
    with pytest.raises(ConfigError, match=r"init.checkpoint=.*nope.pth: no such file"):
        read_checkpoint(tmp_path / "nope.pth", "auto")


def safetensors_with_header(path: Path, header: bytes, declared: int | None = None) -> Path:
    path.write_bytes(struct.pack("<Q", len(header) if declared is None else declared) + header + b"\0" * 16)
    return path


@pytest.mark.parametrize(
    ("header", "declared", "reason"),
    [
        (b"{}", 2**62, "header too large"),
        (b"{}", 10_000, "HeaderTooSmall|invalid|too large|InvalidHeader"),  # past the end of the file
        (b'{"a": {"dtype": "F32", "shape": [4]', None, "InvalidHeaderDeserialization|deserializ"),  # bad JSON
        (json.dumps({"a": {"dtype": "F32", "shape": [10**9], "data_offsets": [0, 4 * 10**9]}}).encode(), None, ""),
    ],
)
def test_broken_safetensors_header_is_one_line_naming_the_file(
    tmp_path: Path, header: bytes, declared: int | None, reason: str
) -> None:
    path = safetensors_with_header(tmp_path / "encoder.safetensors", header, declared)
    with pytest.raises(ConfigError) as e:
        read_checkpoint(path, "auto")
    assert f"init.checkpoint={path} is not a readable safetensors file (SafetensorError" in one_line(e)
    with pytest.raises(ConfigError, match=reason):
        read_checkpoint(path, "auto")


def test_torch_files_that_hold_no_state_dict_are_named(tmp_path: Path) -> None:
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(ConfigError, match=r"list.pth holds a list, not a mapping of weights"):
        read_checkpoint(tmp_path / "list.pth", "auto")
    torch.save({"model": {"w": torch.zeros(2), "note": "text"}}, tmp_path / "mixed.pth")
    with pytest.raises(ConfigError, match=r"teacher.checkpoint=.*mixed.pth is not a state dict: 'note' holds a str"):
        load_state_dict_file(tmp_path / "mixed.pth", "objective.teacher.checkpoint")
    torch.save({"state_dict": [1], "pytorch-lightning_version": "2"}, tmp_path / "odd.ckpt")
    with pytest.raises(ConfigError, match=r"odd.ckpt holds no state dict"):
        read_checkpoint(tmp_path / "odd.ckpt", "auto")
    hparams = {"state_dict": {}, "pytorch-lightning_version": "2", "hyper_parameters": {"encoder_config": 3}}
    torch.save(hparams, tmp_path / "hparams.ckpt")
    with pytest.raises(ConfigError, match=r"hparams.ckpt: its hyper_parameters record no encoder_config"):
        read_checkpoint(tmp_path / "hparams.ckpt", "auto")


def test_init_tensor_of_another_kind_is_refused_naming_the_key(tmp_path: Path) -> None:
    cfg = compose_config(TINY)
    model = create_encoder(cfg.encoder, 32)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["cls_token"] = state["cls_token"].to(torch.int64)  # loading would cast it without a word
    save_file(state, str(tmp_path / "ints.safetensors"))
    init = OmegaConf.create({"checkpoint": str(tmp_path / "ints.safetensors")})
    with pytest.raises(ConfigError, match=r"cls_token holds torch.int64 there but torch.float32 here"):
        load_encoder_weights(model, InitCheckpoint.read(init), cfg.encoder)


def test_a_pickle_payload_as_init_checkpoint_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "marker.txt"
    torch.save({"model": Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(ConfigError) as e:
        read_checkpoint(tmp_path / "evil.pth", "auto")
    assert "is not weights only: it pickles" in one_line(e) and "init.allow_pickle=true on the command" in one_line(e)
    assert not marker.exists()


# ---- files read beside weights -------------------------------------------------------------------------------
@pytest.fixture
def vq_files(tmp_path: Path) -> Path:
    tokenizer = VQTokenizer(vocab_size=16, downsample=4, img_size=16, hidden=8, code_dim=4, res_blocks=1)
    return save_tokenizer(tokenizer, tmp_path / "tok")["tokenizer"]


@pytest.mark.parametrize(
    ("spec", "said"),
    [
        ("not json {", "is not valid JSON"),
        ("[1, 2]", "is not a VQ tokenizer spec"),
        ({"vocab_size": "16"}, "vocab_size='16' is not a int"),
        ({"downsample": True}, "downsample=True is not a int"),
        ({"ema_decay": None}, "ema_decay=None is not a float"),
        ({"layers": 3}, "layers=3 is not one of"),
        ({"img_size": 18}, "img_size=18 must be a multiple of downsample=4"),
    ],
)
def test_tokenizer_json_with_garbage_or_wrong_types_is_named(vq_files: Path, spec, said: str) -> None:
    spec_path = vq_files.with_suffix(".json")
    text = spec if isinstance(spec, str) else json.dumps({**json.loads(spec_path.read_text()), **spec})
    spec_path.write_text(text)
    with pytest.raises(ConfigError) as e:
        tokenizer_spec(OmegaConf.create({"kind": "vq", "path": str(vq_files)}))
    assert said in one_line(e) and str(spec_path) in one_line(e)


@pytest.mark.parametrize(
    ("change", "said"),
    [
        ({"vocab_size": 10**12}, r"codebook has shape \(16, 4\) there but \(1000000000000, 4\) here"),
        ({"hidden": 10**5}, r"encoder.0.weight has shape \(8, 3, 4, 4\) there but \(100000, 3, 4, 4\) here"),
        ({"hidden": 10**9}, "Storage size calculation overflowed"),  # more than torch can lay out
        ({"res_blocks": 10**9}, "res_blocks=1000000000 but the file holds"),
    ],
)
def test_tokenizer_json_declaring_huge_sizes_allocates_nothing(vq_files: Path, change: dict, said: str) -> None:
    spec_path = vq_files.with_suffix(".json")
    spec_path.write_text(json.dumps({**json.loads(spec_path.read_text()), **change}))
    with pytest.raises(ConfigError, match=said) as e:
        load_tokenizer(OmegaConf.create({"kind": "vq", "path": str(vq_files)}))
    assert "does not hold the VQ tokenizer its tokenizer.json describes" in one_line(e)


def test_classifier_metadata_with_garbage_is_named(tmp_path: Path) -> None:
    record = ClassifierRecord("resnet10t", {}, 10, InputSpec.of(32, (0.5,) * 3, (0.5,) * 3))
    meta = {**record.metadata(), "num_classes": "ten", "mean": "[0.5, "}
    path = save_weights({"fc.weight": torch.zeros(10, 4)}, tmp_path / "classifier.safetensors", meta)
    with pytest.raises(ConfigError) as e:
        ClassifierRecord.read(path)
    assert one_line(e).endswith("lacks a valid num_classes, mean; export the classifier again with this toolkit")


# ---- python -m src.export ------------------------------------------------------------------------------------
def run_folder(tmp_path: Path, overrides: list[str], config_name: str = "pretrain") -> Path:
    """A run folder as a run leaves it (its settled config), without training: export reads only files."""
    cfg = compose_config([*overrides, f"runs_dir={tmp_path}", "run_name=run"], config_name)
    settled = prepare(cfg)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / CONFIG_FILE).write_text(config_text(settled.cfg))
    return run_dir


def save_checkpoint(run_dir: Path, name: str, step: int, seed: int) -> dict[str, torch.Tensor]:
    """A checkpoint of the run at ``step``, with weights drawn from ``seed``; returns them."""
    torch.manual_seed(seed)
    cfg = OmegaConf.load(run_dir / CONFIG_FILE)
    state = MAE.from_config(cfg, InitCheckpoint()).state_dict() if cfg.method == "mae" else {}
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    torch.save({"state_dict": state, "global_step": step}, run_dir / "checkpoints" / name)
    return state


PICKLE_SWITCHES = {  # each place a config names a file that may be unpickled: (config, overrides, file key)
    "objective.tokenizer": (
        "pretrain",
        ["objective=beit", "objective.target_patch=4", "objective.tokenizer.kind=dalle"],
    ),
    "objective.teacher": ("pretrain", ["objective=deit", "objective.teacher.arch=resnet10t"]),
    "init": ("finetune", ["objective=knn", "knn=null"]),
}


@pytest.mark.parametrize("section", PICKLE_SWITCHES)
def test_export_takes_no_pickle_permission_from_the_run_folder(tmp_path: Path, section: str) -> None:
    config_name, overrides = PICKLE_SWITCHES[section]
    marker, evil = tmp_path / "marker.txt", tmp_path / "encoder.pkl"
    torch.save({"model": Payload(marker)}, evil)
    file_key = f"{section}.path" if section == "objective.tokenizer" else f"{section}.checkpoint"
    named = [] if section == "init" else [f"{file_key}={evil}"]  # the file these runs check before work
    run_dir = run_folder(tmp_path, [*TINY, *overrides, *named], config_name)
    config = OmegaConf.load(run_dir / CONFIG_FILE)
    OmegaConf.update(config, file_key, str(evil))  # edited, or handed over by someone else:
    OmegaConf.update(config, f"{section}.allow_pickle", True)
    (run_dir / CONFIG_FILE).write_text(OmegaConf.to_yaml(config))
    if config.method != "knn":
        save_checkpoint(run_dir, LAST, step=1, seed=0)
    with pytest.raises(SystemExit) as e:
        main([str(run_dir)])
    message = str(e.value.code)
    assert message.startswith(f"config error: {file_key}={evil} (named by {run_dir / CONFIG_FILE}) pickles")
    assert "\n" not in message and message.endswith("If you trust the file, pass --allow-pickle")
    assert not marker.exists()
    if section == "init":  # the permission of the person typing the command does reach the reader
        with pytest.raises(ConfigError, match="holds no encoder weights"):
            export_run(run_dir, allow_pickle=True)
        assert marker.exists()


def test_a_run_passes_on_only_the_permission_its_command_line_gave() -> None:
    beit = [*TINY, "objective=beit"]
    assert not pickle_allowed(OmegaConf.to_container(compose_config(beit)))
    assert pickle_allowed(OmegaConf.to_container(compose_config([*beit, "objective.tokenizer.allow_pickle=true"])))


@pytest.fixture
def mae_folder(tmp_path: Path) -> Path:
    return run_folder(tmp_path, [*TINY, *MAE_LIGHT])


def test_export_passes_over_an_unreadable_newest_checkpoint(mae_folder: Path, caplog) -> None:
    older = save_checkpoint(mae_folder, PREVIOUS, step=1, seed=1)
    save_checkpoint(mae_folder, LAST, step=2, seed=2)
    last = mae_folder / "checkpoints" / LAST
    last.write_bytes(last.read_bytes()[:2000])  # truncated, as by a full disk
    with caplog.at_level(logging.WARNING):
        exported = load_file(str(export_run(mae_folder)["encoder"]))
    assert f"{last} cannot be read" in caplog.text
    torch.testing.assert_close(exported["cls_token"], older["encoder.cls_token"])  # the older checkpoint's weights

    torch.save({"payload": Payload(mae_folder / "marker.txt")}, mae_folder / "checkpoints" / PREVIOUS)
    with pytest.raises(ConfigError) as e:
        export_run(mae_folder)
    assert f"{last} cannot be read" in one_line(e) and "UnpicklingError" in one_line(e)
    assert "No readable checkpoint is left" in one_line(e) and not (mae_folder / "marker.txt").exists()


def test_export_refuses_a_checkpoint_that_does_not_fit_naming_the_key(mae_folder: Path) -> None:
    state = save_checkpoint(mae_folder, LAST, step=1, seed=0)
    path = mae_folder / "checkpoints" / LAST
    for change, said in [
        ({"encoder.pos_embed": torch.zeros(1, 5, 192)}, r"encoder.pos_embed has shape \(1, 5, 192\) there"),
        ({"encoder.cls_token": torch.zeros(1, 1, 192, dtype=torch.int32)}, "encoder.cls_token holds torch.int32"),
        ({"encoder.cls_token": "text"}, "'encoder.cls_token' holds a str, not a tensor"),
    ]:
        torch.save({"state_dict": {**state, **change}, "global_step": 1}, path)
        with pytest.raises(ConfigError, match=said) as e:
            export_run(mae_folder, checkpoint=path)
        assert str(path) in one_line(e)


def test_a_picture_killed_while_written_leaves_the_previous_one(tmp_path: Path) -> None:
    """A requeue's kill can land while a picture is drawn; the resumed run reads every step*.png back."""
    path = save_png(Image.new("RGB", (4, 4), "red"), tmp_path / "step0000006.png")

    def half_written(f, format: str) -> None:
        f.write(b"\x89PNG\r\n\x1a\n")  # a PNG's first bytes, then the kill
        raise KeyboardInterrupt

    blue = Image.new("RGB", (4, 4), "blue")
    blue.save = half_written
    with pytest.raises(KeyboardInterrupt):
        save_png(blue, path)
    assert Image.open(path).getpixel((0, 0)) == (255, 0, 0)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no partial file left beside it
