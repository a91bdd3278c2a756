"""Config validation: defaults filled in, invalid values named by their key."""

import copy
from pathlib import Path

import pytest
import yaml

from semiseg.config import load_config, validate_config
from semiseg.datasets import RawDataMissing, list_cases, raw_case_paths
from semiseg.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def raw_config():
    return yaml.safe_load((REPO / "config.yaml").read_text(encoding="utf-8"))


def test_project_config_is_valid_with_paper_values():
    cfg = load_config(REPO / "config.yaml")
    ds = cfg["datasets"]
    assert set(ds) >= {"pancreas", "colon", "la", "demo"}
    assert ds["pancreas"]["preprocessing"]["intensity_clip"] == [-125, 275]
    assert ds["pancreas"]["preprocessing"]["target_spacing"] == [1.0, 1.0, 1.0]
    assert ds["pancreas"]["preprocessing"]["crop_margin"] == 25
    assert ds["pancreas"]["patch_size"] == [96, 96, 96] and ds["pancreas"]["stride"] == [16, 16, 16]
    assert ds["la"]["patch_size"] == [112, 112, 80] and ds["la"]["stride"] == [18, 18, 4]
    assert ds["pancreas"]["splits"]["5pct"]["lambda_c"] == 0.01 and ds["pancreas"]["splits"]["20pct"]["lambda_c"] == 0.09
    assert ds["colon"]["splits"]["5pct"]["lambda_c"] == 0.03
    assert ds["colon"]["patch_size"] == [96, 96, 96] and ds["colon"]["stride"] == [16, 16, 16]
    assert ds["colon"]["split"]["test_count"] == 26 and ds["colon"]["raw"]["unlabelled_image"] is None
    assert ds["la"]["splits"]["20pct"]["lambda_c"] == 0.09 and ds["la"]["preprocessing"]["intensity_clip"] is None
    assert ds["la"]["label_map"] == {"0": 0, "255": 1} and ds["la"]["preprocessing"]["target_spacing"] is None
    assert ds["la_h5"]["raw"]["format"] == "community_h5" and ds["la_h5"]["raw"]["spacing"] == [0.625] * 3
    assert ds["pancreas"]["preprocessing"]["label_orientation"] == "auto"
    assert ds["pancreas"]["splits"]["5pct"]["lambda_r"] == 0.1  # default from the schema
    assert cfg["device"] == "auto"


def test_defaults_filled(raw_config):
    del raw_config["datasets"]["demo"]["preprocessing"]["crop_margin"]
    del raw_config["device"]
    cfg = validate_config(raw_config)
    assert cfg["datasets"]["demo"]["preprocessing"]["crop_margin"] == 25 and cfg["device"] == "auto"
    assert cfg["datasets"]["demo"]["preprocessing"]["interpolation"] == "linear"


@pytest.mark.parametrize(
    ("path", "value", "key"),
    [
        (("datasets", "demo", "preprocessing", "crop_margin"), -1, "datasets.demo.preprocessing.crop_margin"),
        (("datasets", "demo", "preprocessing", "crop_source"), "lungs", "datasets.demo.preprocessing.crop_source"),
        (("datasets", "demo", "patch_size"), [64, 64, 30], "datasets.demo.patch_size.2"),
        (("datasets", "la", "modality"), "PET", "datasets.la.modality"),
        (("datasets", "demo", "splits", "5pct", "lambda_c"), -0.5, "datasets.demo.splits.5pct.lambda_c"),
        (("device",), "gpu", "device"),
    ],
)
def test_invalid_value_names_key(raw_config, path, value, key):
    cfg = copy.deepcopy(raw_config)
    node = cfg
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(cfg)


def test_unknown_key_rejected(raw_config):
    raw_config["datasets"]["demo"]["preprocesing"] = {}
    with pytest.raises(ConfigError, match="preprocesing"):
        validate_config(raw_config)


def test_raw_paths_and_case_listing(tmp_path):
    ds = {"raw": {"dir": str(tmp_path), "image": "Pancreas-CT/{case}", "label": "labels/label{case_digits}.nii.gz"}}
    img, lab = raw_case_paths(ds, "PANCREAS_0007")
    assert img == tmp_path / "Pancreas-CT" / "PANCREAS_0007" and lab == tmp_path / "labels" / "label0007.nii.gz"
    for c in ("PANCREAS_0001", "PANCREAS_0002"):
        (tmp_path / "Pancreas-CT" / c).mkdir(parents=True)
    (tmp_path / "Pancreas-CT" / "LICENSE").touch()  # beside the series folders in TCIA downloads
    assert list_cases("pancreas", ds) == ["PANCREAS_0001", "PANCREAS_0002"]
    msd = {"raw": {"dir": str(tmp_path / "msd"), "image": "imagesTr/{case}.nii.gz"}}
    (tmp_path / "msd" / "imagesTr").mkdir(parents=True)
    for c in ("colon_001", "colon_005"):
        (tmp_path / "msd" / "imagesTr" / f"{c}.nii.gz").touch()
    (tmp_path / "msd" / "imagesTr" / "._colon_001.txt").touch()
    (tmp_path / "msd" / "imagesTr" / "._colon_009.nii.gz").touch()  # macOS metadata in the MSD archives
    assert list_cases("colon", msd) == ["colon_001", "colon_005"]


def test_missing_raw_data_message(tmp_path):
    ds = {"raw": {"dir": str(tmp_path / "nowhere"), "image": "imagesTr/{case}.nii.gz"}, "source": "http://example.org/data"}
    with pytest.raises(RawDataMissing) as info:
        list_cases("colon", ds)
    msg = str(info.value)
    assert str(tmp_path / "nowhere") in msg and "http://example.org/data" in msg and "demo" in msg


def test_dataset_training_overrides_are_validated(raw_config):
    raw_config["datasets"]["demo"]["training"]["iterations"] = 0
    with pytest.raises(ConfigError, match=r"datasets\.demo\.training\.iterations"):
        validate_config(raw_config)
    raw_config["datasets"]["demo"]["training"] = {"iteratons": 5}
    with pytest.raises(ConfigError, match="iteratons"):
        validate_config(raw_config)


def test_stage2_loss_setting(raw_config):
    cfg = validate_config(copy.deepcopy(raw_config))
    assert cfg["training"]["stage2_loss"] == "authors"
    del raw_config["training"]["stage2_loss"]
    assert validate_config(copy.deepcopy(raw_config))["training"]["stage2_loss"] == "authors"  # the schema's default
    raw_config["training"]["stage2_loss"] = "mean"
    with pytest.raises(ConfigError, match=r"training\.stage2_loss"):
        validate_config(raw_config)


def test_override_strings_are_read_as_yaml_scalars(raw_config):
    """Snakemake's --config passes nested values as strings ('0.02', 'true'): they get the
    types config.yaml would give, and strings the schema accepts stay strings."""
    from semiseg.config import coerce_scalars

    cfg = copy.deepcopy(raw_config)
    cfg["training"]["lr"] = "0.02"
    cfg["training"]["iterations"] = "300"
    cfg["evaluation"]["amp"] = "true"
    cfg["evaluation"]["unit"] = "null"
    cfg["datasets"]["demo"]["training"]["dropout"] = "0.2"
    cfg["datasets"]["demo"]["raw"]["dir"] = "1234"  # a path: a string the schema accepts
    validate_config(cfg)
    assert cfg["training"]["lr"] == 0.02 and cfg["training"]["iterations"] == 300
    assert cfg["evaluation"]["amp"] is True and cfg["evaluation"]["unit"] is None
    assert cfg["datasets"]["demo"]["training"]["dropout"] == 0.2
    assert cfg["datasets"]["demo"]["raw"]["dir"] == "1234"
    cfg["training"]["lr"] = "fast"  # no YAML reading helps: the usual error
    with pytest.raises(ConfigError, match=r"training.lr: 'fast' is not of type 'number'"):
        validate_config(cfg)
    cfg["training"]["lr"] = "-1"  # the YAML reading the schema rejects too: kept, and reported
    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text(encoding="utf-8"))
    assert "training.lr" not in coerce_scalars(cfg, schema)
