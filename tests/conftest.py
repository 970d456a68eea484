import pytest

from train_helpers import make_corpus


@pytest.fixture
def homestar_home(tmp_path, monkeypatch):
    """A private HOMESTAR_HOME so tests never touch the user's runs or caches."""
    home = tmp_path / "home"
    monkeypatch.setenv("HOMESTAR_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))
