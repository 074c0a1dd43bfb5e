"""Parameter models: unknown sections and keys with the closest valid name, no bool/number mix-ups, and
``kedro run`` printing the validation message alone (a real subprocess)."""

from __future__ import annotations

import pytest
import yaml

from partmatch import config
from partmatch.config import ParameterError
from tests.conftest import PROJECT_ROOT, kedro_cli, new_kedro_project


def _numeric_fields() -> list[tuple[str, str, str | None]]:
    """(section, field, 'an integer' | 'a number') for every int or float field of every section's model; None
    for a number that may also be a word (e.g. ``workers: auto | N``): its own validator words the message."""
    rows = []
    for section, model in config.SECTIONS.items():
        for name, field in model.model_fields.items():
            types = config._field_types(field.annotation)
            if bool in types:
                continue
            if str in types and {int, float} & types:
                rows.append((section, name, None))
            elif int in types:
                rows.append((section, name, "an integer"))
            elif float in types:
                rows.append((section, name, "a number"))
    return rows


def test_every_numeric_field_is_covered():
    fields = {(s, f) for s, f, _ in _numeric_fields()}
    assert ("ingestion", "min_images_per_class") in fields and ("split", "seed") in fields
    assert ("cnn", "epochs") in fields and ("search", "top_k") in fields and ("cnn", "lr") in fields
    assert len(fields) == sum(1 for s, m in config.SECTIONS.items() for f in m.model_fields.values()
                              if {int, float} & config._field_types(f.annotation)
                              and bool not in config._field_types(f.annotation))


@pytest.mark.parametrize(("section", "name", "kind"), _numeric_fields())
def test_a_boolean_is_not_a_number(section, name, kind):
    file = config.PARAMETER_FILES[section]
    with pytest.raises(ParameterError) as err:
        config.parse(section, {name: True})
    line = str(err.value).splitlines()[1]
    if kind is None:   # refused all the same, naming the field and the value
        assert line.startswith(f"  - '{section}.{name}': must be ") and line.endswith(" (got True)"), line
    else:
        assert line == f"  - '{section}.{name}': must be {kind}, not a boolean (got True)"
    assert str(err.value).splitlines()[-1] == f"Fix them in conf/base/{file} or with --params={section}.KEY=VALUE."


def test_a_number_is_not_a_flag():
    with pytest.raises(ParameterError) as err:
        config.parse("cnn", {"amp": 1})
    assert str(err.value).splitlines()[1] == "  - 'cnn.amp': must be true or false, not a number (got 1)"
    assert config.parse("cnn", {"amp": False}).amp is False


def test_nested_index_ints_refuse_booleans():
    with pytest.raises(ParameterError) as err:
        config.parse("search", {"index": {"hnsw_m": True}})
    assert str(err.value).splitlines()[1] == "  - 'search.index.hnsw_m': must be an integer, not a boolean (got True)"


def test_yaml_values_still_pass():
    """The shipped parameter files validate, ints stay ints, and ints are accepted where a float is expected."""
    params = {}
    for path in sorted((PROJECT_ROOT / "conf" / "base").glob("parameters*.yml")):
        params.update(yaml.safe_load(path.read_text()) or {})
    parsed = config.validate_all(params)
    assert set(parsed) == set(params)
    assert parsed["ingestion"].min_images_per_class == params["ingestion"]["min_images_per_class"]
    assert type(parsed["split"].seed) is int
    margin = config.parse("cnn", {"margin": 2}).loss["parts"][0]["args"]["margin"]   # old flat key, translated
    assert margin == 2.0 and type(margin) is float
    assert config.parse("split", {"seed": "7"}).seed == 7   # a quoted number from YAML is still a number


def test_unknown_section_names_the_closest_valid_one():
    with pytest.raises(ParameterError) as err:
        config.validate_all({"spilt": {"seed": 7}, "raw_source": "x", "split": {}})
    assert str(err.value) == ("Unknown parameters:\n"
                              "  - 'spilt': unknown parameter section: did you mean 'split'?\n"
                              "Fix them in conf/base/parameters*.yml, conf/local/ or --params.")


def test_unknown_section_without_a_close_name_lists_the_known_ones():
    with pytest.raises(ParameterError) as err:
        config.validate_all({"zzz": 1})
    assert str(err.value).splitlines()[1] == (
        "  - 'zzz': unknown parameter section; known: cnn, compare, eda, evaluate, ingestion, multi_objective, "
        "preprocessing, "
        "raw_source, search, siamese_contrastive, siamese_pca, siamese_pretrained, siamese_triplet, split")


def test_unknown_key_inside_a_section_names_the_closest_field():
    with pytest.raises(ParameterError) as err:
        config.parse("split", {"sede": 3})
    assert str(err.value).splitlines()[1] == "  - 'split.sede': Extra inputs are not permitted (got 3): did you mean 'seed'?"
    with pytest.raises(ParameterError) as err:
        config.parse("search", {"index": {"ef_serach": 3}})
    assert str(err.value).splitlines()[1] == (
        "  - 'search.index.ef_serach': Extra inputs are not permitted (got 3): did you mean 'ef_search'?")


def test_unknown_section_fails_a_session_before_any_work(kedro_project, photo_folder):
    with pytest.raises(ParameterError, match=r"'spilt': unknown parameter section: did you mean 'split'\?"):
        kedro_project("ingestion", raw_source=str(photo_folder), spilt={"seed": 7})
    assert not list((kedro_project.path / "data").rglob("*.parquet"))


@pytest.mark.slow
def test_kedro_run_prints_the_validation_message_alone(tmp_path, photo_folder, monkeypatch):
    monkeypatch.chdir(tmp_path)
    project = new_kedro_project(tmp_path / "project").path
    proc = kedro_cli(project, "run", "--pipeline=ingestion",
                     f"--params=raw_source={photo_folder},spilt.seed=7,ingestion.min_images_per_class=true")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-6:] == [
        "Error: Unknown parameters:",
        "  - 'spilt': unknown parameter section: did you mean 'split'?",
        "Fix them in conf/base/parameters*.yml, conf/local/ or --params.",
        "Invalid parameters:",
        "  - 'ingestion.min_images_per_class': must be an integer, not a boolean (got True)",
        "Fix them in conf/base/parameters_ingestion.yml or with --params=ingestion.KEY=VALUE.",
    ]
    assert not list((project / "data").rglob("*.parquet"))   # nothing was done
    assert not (project / "mlflow.db").exists()              # not even the tracking store was touched


def test_main_module_uses_the_same_run_command():
    from kedro.framework.cli.utils import find_run_command

    from partmatch import cli

    assert find_run_command("partmatch") is cli.run
    assert cli.run.name == "run" and {p.name for p in cli.run.params} >= {"pipeline", "params", "env"}


@pytest.mark.parametrize("section", ["siamese_pretrained", "search"])
def test_rerank_mode_names_the_dotted_key_and_the_options(section):
    with pytest.raises(ParameterError) as err:
        config.parse(section, {"rerank": {"mode": "k-reciprocal"}})
    assert str(err.value).splitlines()[1] == (
        f"  - '{section}.rerank.mode': Input should be 'none', 'qe', 'k_reciprocal' or 'pairwise' "
        "(got 'k-reciprocal')")
    assert config.parse(section, {}).rerank.mode == "none"  # the default keeps every number


def test_rerank_arguments_are_checked_against_top_n():
    with pytest.raises(ParameterError) as err:
        config.parse("search", {"rerank": {"mode": "k_reciprocal", "k1": 30, "top_n": 20}})
    assert str(err.value).splitlines()[1] == (
        "  - 'search.rerank': k1 (30) cannot exceed top_n (20): the k-reciprocal sets are taken among the query's "
        "top_n candidates (got {'mode': 'k_reciprocal', 'k1': 30, 'top_n': 20})")
    with pytest.raises(ParameterError, match=r"'cnn.rerank': qe_n \(5\) cannot exceed top_n \(3\)"):
        config.parse("cnn", {"rerank": {"mode": "qe", "qe_n": 5, "top_n": 3}})
    with pytest.raises(ParameterError, match=r"'cnn.rerank.lambda_value': Input should be less than or equal to 1"):
        config.parse("cnn", {"rerank": {"lambda_value": 2}})
    with pytest.raises(ParameterError, match=r"'search.rerank.topn': Extra inputs .* did you mean 'top_n'\?"):
        config.parse("search", {"rerank": {"topn": 5}})


def test_only_the_recommended_model_has_its_own_input_size_and_colour():
    parsed = config.validate_all({"siamese_pretrained": {"image_size": 224, "color_mode": "rgb"}, "cnn": {}})
    assert (parsed["siamese_pretrained"].image_size, parsed["siamese_pretrained"].color_mode) == (224, "rgb")
    assert (parsed["cnn"].image_size, parsed["cnn"].color_mode) == (None, None)   # null = preprocessing's
    with pytest.raises(ParameterError) as err:
        config.validate_all({"cnn": {"image_size": 224}, "siamese_triplet": {"color_mode": "rgb"}})
    text = str(err.value)
    assert "'cnn.image_size': only siamese_pretrained has its own input; cnn trains on image_array (set " \
           "preprocessing.image_size instead)" in text
    assert "'siamese_triplet.color_mode'" in text and "parameters_siamese_triplet.yml" in text
    with pytest.raises(ParameterError, match=r"'siamese_pretrained.color_mode'"):
        config.parse("siamese_pretrained", {"color_mode": "cmyk"})
    with pytest.raises(ParameterError, match=r"'siamese_pretrained.image_size'"):
        config.parse("siamese_pretrained", {"image_size": 4})
