import torch

from research.evaluation.classifier import FashionClassifier, load_classifier, save_classifier


def test_classifier_cache_is_safetensors_and_checks_how_it_was_trained(tmp_path):
    path = tmp_path / "clf.safetensors"
    model = FashionClassifier().eval()
    save_classifier(model, path, {"epochs": "1", "num_classes": "10"})
    assert path.read_bytes()[8:9] == b"{"  # a safetensors JSON header, not a pickle
    loaded = load_classifier(path, {"epochs": "1"})
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(loaded(x), model(x))
    assert load_classifier(path, {"epochs": "2"}) is None
    path.write_bytes(b"garbage")
    assert load_classifier(path, {"epochs": "1"}) is None
