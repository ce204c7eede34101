from tests.helpers import tiny_vit
from tests.methods.common import backbone_scalars, check_method


def test_full(tmp_path):
    check_method("full", expected_backbone=backbone_scalars(tiny_vit()), tmp_path=tmp_path)


def test_linear(tmp_path):
    check_method("linear", expected_backbone=0, tmp_path=tmp_path)
