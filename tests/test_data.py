"""Data sets, the user's .npz files, and the batch iterator."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest

from jaxbp import checkpoint, data


class TestDigits:
    def test_fixed_split_and_standardisation(self):
        ds = data.load_digits()
        assert ds.x_train.shape == (1438, 64) and ds.x_test.shape == (359, 64)
        assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
        assert set(np.unique(ds.y_train)) == set(range(10)) and ds.n_out == 10
        assert ds.is_classification and ds.n_in == 64
        used = ds.x_train.std(axis=0) > 0
        np.testing.assert_allclose(ds.x_train.mean(axis=0), 0, atol=1e-5)
        np.testing.assert_allclose(ds.x_train.std(axis=0)[used], 1, rtol=1e-4)

    def test_deterministic(self):
        a, b = data.load_digits(), data.load_digits()
        np.testing.assert_array_equal(a.x_test, b.x_test)
        np.testing.assert_array_equal(a.y_train, b.y_train)
        c = data.load_digits(seed=1)
        assert not np.array_equal(a.y_test, c.y_test)

    def test_matches_scikit_learn_when_installed(self):
        datasets = pytest.importorskip("sklearn.datasets")
        reference = datasets.load_digits()
        with np.load(data._DIGITS) as shipped:
            np.testing.assert_array_equal(shipped["x"], reference.data)
            np.testing.assert_array_equal(shipped["y"], reference.target)


def test_teacher_regression():
    ds = data.teacher_regression(jax.random.key(0), n_train=100, n_test=20, sizes=(5, 7, 3))
    assert ds.x_train.shape == (100, 5) and ds.y_train.shape == (100, 3)
    assert ds.x_test.shape == (20, 5) and not ds.is_classification and ds.n_out == 3
    again = data.teacher_regression(jax.random.key(0), n_train=100, n_test=20, sizes=(5, 7, 3))
    np.testing.assert_array_equal(ds.y_test, again.y_test)
    for kwargs, words in (({"n_train": 1.5}, "n_train must be an int >= 1, got 1.5"),
                          ({"n_test": 0}, "n_test must be an int >= 1, got 0"),
                          ({"noise": -1}, "noise must be a finite number >= 0, got -1")):
        with pytest.raises(ValueError, match=words):
            data.teacher_regression(jax.random.key(0), **kwargs)


class TestNpz:
    def test_labels_with_automatic_split(self, tmp_path):
        rng = np.random.default_rng(0)
        path = tmp_path / "mine.npz"
        np.savez(path, x=rng.normal(size=(50, 3)) * 5 + 2, y=rng.integers(0, 4, 50))
        ds = data.load_npz(path)
        assert ds.x_train.shape == (40, 3) and ds.x_test.shape == (10, 3)
        assert ds.y_train.dtype == np.int32 and ds.is_classification
        np.testing.assert_allclose(ds.x_train.mean(axis=0), 0, atol=1e-5)

    def test_explicit_test_arrays(self, tmp_path):
        path = tmp_path / "mine.npz"
        np.savez(path, x=np.ones((8, 2)), y=np.zeros((8, 3)), x_test=np.ones((4, 2)),
                 y_test=np.zeros((4, 3)))
        ds = data.load_npz(path)
        assert ds.x_train.shape == (8, 2) and ds.y_test.shape == (4, 3)
        assert ds.y_train.dtype == np.float32

    @pytest.mark.parametrize("arrays,message", [
        ({"x": np.ones((4, 2))}, "has no array 'y'"),
        ({"y": np.ones(4, int)}, "has no array 'x'"),
        ({"x": np.ones(4), "y": np.ones(4, int)}, "array 'x' has shape (4,)"),
        ({"x": np.ones((4, 2)), "y": np.ones(5, int)}, "array 'y' has shape (5,)"),
        ({"x": np.ones((4, 2)), "y": np.ones(4)}, "must be integers, got float64"),
        ({"x": np.ones((4, 2)), "y": -np.ones(4, int)}, "negative labels"),
        ({"x": np.full((4, 2), np.nan), "y": np.ones(4, int)}, "'x' must be finite"),
        ({"x": np.ones((4, 2)) * 1j, "y": np.ones(4, int)},
         "array 'x' holds complex numbers (dtype complex128)"),
        ({"x": np.ones((4, 2)), "y": np.ones((4, 3), np.complex64)},
         "array 'y' holds complex numbers (dtype complex64)"),
        ({"x": np.ones((4, 2)), "y": np.ones(4, int), "x_test": np.ones((2, 2))},
         "both 'x_test' and 'y_test'"),
        ({"x": np.ones((4, 2)), "y": np.ones(4, int), "x_test": np.ones((2, 3)),
          "y_test": np.ones(2, int)}, "'x_test' has 3 columns but 'x' has 2"),
        # an empty training set, standardised into NaN tests, was returned:
        ({"x": np.ones((1, 2)), "y": np.ones(1, int)}, "1 sample cannot be split into a "
                                                       "training and a test part"),
    ])
    def test_bad_files_name_the_file_and_array(self, tmp_path, arrays, message):
        path = tmp_path / "bad.npz"
        np.savez(path, **arrays)
        with pytest.raises(ValueError) as info:
            data.load_npz(path)
        assert message in str(info.value) and "bad.npz" in str(info.value)

    def test_a_split_leaves_at_least_one_sample_on_each_side(self):
        assert data.load_digits(test_fraction=0.999).x_train.shape == (2, 64)
        for fraction, words in ((0.9999, "test_fraction 0.9999 of 1797 samples holds out 1797, "
                                         "leaving none to train on"),
                                ("0.2", "test_fraction must be a number in (0, 1), got '0.2'")):
            with pytest.raises(ValueError, match=re.escape(words)):
                data.load_digits(test_fraction=fraction)

    def test_missing_and_unreadable_files(self, tmp_path):
        with pytest.raises(FileNotFoundError, match=r"nope\.npz"):
            data.load_npz(tmp_path / "nope.npz")
        (tmp_path / "text.npz").write_text("not a zip")
        with pytest.raises(ValueError, match=r"text\.npz' is not an \.npz archive \(it starts "
                                             r"with b'not a zi'\); save the arrays with np.savez"):
            data.load_npz(tmp_path / "text.npz")


class TestBatches:
    def test_same_key_same_order_and_every_sample_once(self):
        x, y = np.arange(10)[:, None].astype(np.float32), np.arange(10)
        first = list(data.batches(x, y, 3, jax.random.key(1)))
        second = list(data.batches(x, y, 3, jax.random.key(1)))
        assert [len(b[1]) for b in first] == [3, 3, 3, 1]
        for (xa, ya), (_xb, yb) in zip(first, second):
            np.testing.assert_array_equal(ya, yb)
            np.testing.assert_array_equal(xa[:, 0], ya)
        assert sorted(np.concatenate([b[1] for b in first])) == list(range(10))
        other = np.concatenate([b[1] for b in data.batches(x, y, 3, jax.random.key(2))])
        assert not np.array_equal(other, np.concatenate([b[1] for b in first]))

    def test_drop_last_and_no_key(self):
        x, y = np.zeros((10, 1)), np.arange(10)
        kept = list(data.batches(x, y, 4, drop_last=True))
        assert [list(b[1]) for b in kept] == [[0, 1, 2, 3], [4, 5, 6, 7]]
        assert data.num_batches(10, 4, True) == 2 and data.num_batches(10, 4, False) == 3

    def test_bad_arguments(self):
        with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
            list(data.batches(np.zeros((2, 1)), np.zeros(2), 0))
        with pytest.raises(ValueError, match=r"x has shape \(2, 1\) and y \(3,\): expected one "
                                             r"row of y per row of x"):
            list(data.batches(np.zeros((2, 1)), np.zeros(3), 1))
        # lists were indexed by an index array: "only integer scalar arrays can be converted"
        pairs = list(data.batches([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], [0, 1, 2], 2))
        np.testing.assert_array_equal(pairs[1][0], [[5.0, 6.0]])
        with pytest.raises(TypeError, match="x must be a numeric array, got str"):
            list(data.batches("abc", [0, 1, 2], 2))


def test_load_text_ships_tiny_shakespeare_as_next_character_windows():
    text = data.load_text(seq_len=32)
    assert len(text.vocab) == 65 and text.n_out == 65 and text.n_in == 32
    assert text.x_train.dtype == np.int32 and text.x_train.shape[1] == 32
    np.testing.assert_array_equal(text.x_train[:, 1:], text.y_train[:, :-1])   # y = x shifted
    np.testing.assert_array_equal(text.x_train[1:, 0], text.y_train[:-1, -1])  # windows abut
    assert text.decode(text.x_train[0][:14]) == "First Citizen:"
    n = len(text.x_train) * 32 + len(text.x_test) * 32
    assert 0.89 < len(text.x_train) * 32 / n < 0.91                           # a 10% tail
    np.testing.assert_array_equal(text.encode("First"), text.x_train[0][:5])


def test_load_text_reads_a_users_file_and_names_what_is_wrong(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("abcabcabcabcabcabcabcabcabcabc")
    text = data.load_text(path, seq_len=4, validation_fraction=0.3)
    assert text.vocab == "abc" and text.decode(text.y_train[0]) == "bcab"
    with pytest.raises(ValueError, match="too short for one window"):
        data.load_text(path, seq_len=20)
    with pytest.raises(ValueError, match="seq_len must be an int >= 1"):
        data.load_text(path, seq_len=0)
    with pytest.raises(ValueError, match=r"validation_fraction must be in \(0, 1\), got '0.1'"):
        data.load_text(path, seq_len=4, validation_fraction="0.1")
    with pytest.raises(FileNotFoundError, match=r"text file '.*missing\.txt' does not exist"):
        data.load_text(tmp_path / "missing.txt")
    for load in (data.load_text, data.load_npz):   # load_npz said a folder "does not exist"
        with pytest.raises(IsADirectoryError, match=r"file '.*' is a folder, expected a file"):
            load(tmp_path)
    with pytest.raises(IsADirectoryError, match=r"checkpoint '.*' is a folder, expected a file"):
        checkpoint.read(tmp_path)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 20)
    with pytest.raises(ValueError, match=r"latin1\.txt' is not UTF-8 text: 'utf-8' codec"):
        data.load_text(tmp_path / "latin1.txt", seq_len=4)
    (tmp_path / "bom.txt").write_bytes("\ufeffabcabcabcabcabcabc".encode())  # Notepad's
    assert data.load_text(tmp_path / "bom.txt", 4, 0.3).vocab == "abc"   # BOM: no token
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.txt' is empty"):
        data.load_text(tmp_path / "empty.txt")
    (tmp_path / "one.txt").write_text("a" * 100)   # was a GPT whose loss is 0 from the start
    with pytest.raises(ValueError, match=r"one\.txt' holds one distinct character, 'a': "
                                         r"there is nothing to predict"):
        data.load_text(tmp_path / "one.txt", seq_len=4)
    (tmp_path / "plain.gz").write_text("not gzip at all")
    with pytest.raises(ValueError, match=r"plain\.gz' cannot be read: Not a gzipped file"):
        data.load_text(tmp_path / "plain.gz", seq_len=4)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        text.encode("abd")
    assert text.decode([]) == "" and text.decode(np.array([[2, 0]])) == "ca"
    for ids in ([3], [-1, 0]):      # -1 (an ignored target) would read as the last one
        with pytest.raises(ValueError, match=r"ids must be in \[0, 3\)"):
            text.decode(ids)
    with pytest.raises(TypeError, match="ids must be integers, got float64"):
        text.decode([0.5])
