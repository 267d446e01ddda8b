import pytest
import torch

from graddyn.experiments._seeds import check_seeds, load_study_data


def test_preprocessing_choices():
    scaled = load_study_data("digits", "", "scale")
    assert float(scaled.train_x.min()) == 0.0 and float(scaled.train_x.max()) == 1.0
    std = load_study_data("digits", "", "standardize")
    assert abs(float(std.train_x.mean())) < 1e-5
    assert torch.equal(scaled.train_y, std.train_y)


def test_errors_name_the_fix():
    with pytest.raises(ValueError, match="preprocess must be one of scale, standardize"):
        load_study_data("digits", "", "whiten")
    with pytest.raises(ValueError, match="no input preprocessing to choose"):
        load_study_data("blobs", "", "scale")
    with pytest.raises(ValueError, match="non-empty"):
        check_seeds(())
    with pytest.raises(ValueError, match="distinct"):
        check_seeds((0, 0))
    check_seeds((0, 1, 2))
