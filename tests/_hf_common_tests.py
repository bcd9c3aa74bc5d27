"""Makes transformers' own common test mixins importable for our out-of-tree models.

transformers ships `tests/test_modeling_common.py` & co. only in its sdist. We fetch the sdist of the *installed*
version from the package registry once (the same place the package itself came from), extract the few files we
need into a git-ignored folder and add the small stubs their imports expect. They are then importable as
`transformers_tests.test_modeling_common` etc. Set `HF_MSVIT_TRANSFORMERS_SDIST` to a local sdist to skip the
download.
"""

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers


COMMON_FILES = (
    "test_modeling_common.py",
    "test_configuration_common.py",
    "test_image_processing_common.py",
    "test_backbone_common.py",
)

# Imports of the common files that point at parts of transformers' repo which the sdist does not ship.
STUBS = {
    "transformers_tests/__init__.py": "",
    "transformers_tests/exporters/__init__.py": "",
    # transformers' export tests (not in the sdist): our stand-in, `tests/_export_tester.py`
    "transformers_tests/exporters/test_export.py": "from _export_tester import ExportTesterMixin  # noqa: F401\n",
    "transformers_tests/generation/__init__.py": "",
    "transformers_tests/generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
    "transformers_tests/utils/__init__.py": "",
    "transformers_tests/utils/test_configuration_utils.py": (
        "config_common_kwargs = {\n"
        "    'return_dict': False,\n"
        "    'output_hidden_states': True,\n"
        "    'output_attentions': True,\n"
        "    'dtype': 'float16',\n"
        "    'chunk_size_feed_forward': 5,\n"
        "    'architectures': ['BertModel'],\n"
        "    'id2label': {0: 'label'},\n"
        "    'label2id': {'label': '0'},\n"
        "    'problem_type': 'regression',\n"
        "}\n"
    ),
    "utils/fetch_hub_objects_for_ci.py": "def url_to_local_path(url, *args, **kwargs):\n    return url\n",
}


def _download_sdist(version: str, dest: str) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
    cmd += [f"transformers=={version}", "-d", dest]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(Path(dest).glob(f"transformers-{version}.tar.gz"))
    if result.returncode != 0 or not found:
        raise RuntimeError(
            f"Could not download the transformers {version} sdist for its common tests:\n{result.stderr[-2000:]}\n"
            "Set HF_MSVIT_TRANSFORMERS_SDIST to a local copy of the sdist to run the tests without the registry."
        )
    return found[0]


def ensure_common_tests() -> Path:
    """Returns the folder holding `transformers_tests/`, creating it on first use, and puts it on `sys.path`."""
    version = transformers.__version__
    root = Path(__file__).parent / "_hf_common" / version
    marker = root / ".complete"
    if not marker.exists():
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            sdist = os.environ.get("HF_MSVIT_TRANSFORMERS_SDIST") or _download_sdist(version, tmp)
            with tarfile.open(sdist) as tar:
                for name in COMMON_FILES:
                    member = tar.getmember(f"transformers-{version}/tests/{name}")
                    data = tar.extractfile(member).read()
                    target = root / "transformers_tests" / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(data)
        marker.write_text(version)
    # The stubs are ours: rewritten on every run, so that a cache made by an older version of this file follows them.
    for rel, text in STUBS.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return root
