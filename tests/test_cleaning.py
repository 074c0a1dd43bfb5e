"""The cleaning rules: keyword families (both sides), unsafe names, duplicates."""

import pandas as pd
import pytest

from partmatch.cleaning import find_duplicates, matched_family, unsafe_label_reason
from partmatch.config import IngestionParams

FAMILIES = IngestionParams().excluded_families


@pytest.mark.parametrize("name,family", [
    ("Axle Seal", "Seal"), ("Wheel Bearing", "Bearing"), ("Driveshaft", "Shaft"), ("CAMSHAFT", "Shaft"),
    ("CRANKSHAFT", "Shaft"), ("Heater Hose", "Hose"), ("RADIATOR HOSE", "Hose"), ("Control Arm", "Arm"),
    ("IDLER ARM", "Arm"), ("LOWER CONTROL ARM", "Arm"), ("Brake Pad Set", "Set"), ("Timing Belt", "Belt"),
    ("Sway Bar Link", "Link"), ("Strut Mount Bushing", "Bushing"), ("Gasket Kit", "Kit"), ("Tie Strap", "Strap"),
    ("wiper arms", "Arm"), ("Half-Shaft", "Shaft"), ("Oil seals", "Seal"), ("Sway bar bushings", "Bushing"),
    ("Hoses", "Hose"), ("camshaft_bearing", "Bearing"),
])
def test_excluded_families_are_caught(name, family):
    assert matched_family(name, FAMILIES) == family


@pytest.mark.parametrize("name", [
    "Alarm", "Alarm Siren", "Armrest", "Sunset Visor", "Harmonic Balancer", "Kitchen Light", "Setter",
    "BRAKE PAD", "RADIATOR", "SPARK PLUG", "Hosepipe Nozzle", "Linkage", "Sealant", "Beltline Molding",
])
def test_look_alikes_survive(name):
    assert matched_family(name, FAMILIES) is None


def test_always_keep_overrides_family():
    assert matched_family("Control Arm", FAMILIES, always_keep=["control arm"]) is None


def test_compound_rule_only_for_long_keywords():
    assert matched_family("Camshaft", FAMILIES, compound_min_length=6) is None  # 'shaft' is 5 letters
    assert matched_family("Camshaft", FAMILIES, compound_min_length=5) == "Shaft"


@pytest.mark.parametrize("label,ok", [("Brake Disc", True), ("A/B", False), ("..", False), ("x\\y", False),
                                      ("../etc", False), ("", False), ("Wheel 12in", True)])
def test_unsafe_labels(label, ok):
    assert (unsafe_label_reason(label) is None) is ok


def test_duplicates_within_and_across_categories():
    manifest = pd.DataFrame({
        "path": ["a/1.jpg", "a/2.jpg", "a/3.jpg", "b/1.jpg", "c/1.jpg"],
        "label": ["a", "a", "a", "b", "c"],
        "sha256": ["h1", "h1", "h2", "h2", "h3"],
    })
    reasons, conflicts = find_duplicates(manifest)
    assert reasons[0] is None and "exact duplicate of a/1.jpg" in reasons[1]
    assert "conflict" in reasons[2] and "conflict" in reasons[3]
    assert reasons[4] is None
    assert conflicts == [{"sha256": "h2", "labels": ["a", "b"], "paths": ["a/3.jpg", "b/1.jpg"]}]


def test_one_file_listed_under_two_labels_is_a_conflict():
    manifest = pd.DataFrame({"path": ["x.jpg", "x.jpg", "y.jpg"], "label": ["a", "b", "a"],
                             "sha256": ["h1", "h1", "h2"]})
    reasons, conflicts = find_duplicates(manifest)
    assert list(reasons) == ["duplicate conflict: the manifest lists this file under ['a', 'b']"] * 2 + [None]
    assert conflicts == [{"sha256": "h1", "labels": ["a", "b"], "paths": ["x.jpg", "x.jpg"]}]
