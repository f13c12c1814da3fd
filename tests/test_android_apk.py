"""The Android app built offline into a signed APK (apps/android/tools/build-apk.py), and its checks.

What this shows: MainActivity and the ExecuTorch adapter compile against android.jar API 23 (the
adapter against the compile-only LlmModule stub, whose signatures must equal the committed list
checked against the upstream sources), the core compiles against API 23 too, everything dexes at
min-sdk 23, the APK is signed and verifies, its manifest names the launchable MainActivity, and the
dex holds the app and core classes but none of the stub's. What it cannot show: the APK running
(no emulator here), the Gradle build, the real executorch-android AAR.

Toolchain: tools/android_apk_toolchain.py + tools/android_toolchain.py (`make test` runs the first
through `make android-apk-toolchain`; the fixture ensures both).
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BUILD_APK = REPO / "apps" / "android" / "tools" / "build-apk.py"
PACKAGE = "org.minicpmvedge.app"

# Classes the APK must define (dexdump descriptors).
APP_CLASSES = [
    "Lorg/minicpmvedge/app/MainActivity;",
    "Lorg/minicpmvedge/app/CaptureProvider;",
    "Lorg/minicpmvedge/app/Runner;",
    "Lorg/minicpmvedge/app/ExecuTorchLlmRunner;",
    "Lorg/minicpmvedge/app/BundleInfo;",
    "Lorg/minicpmvedge/app/R$layout;",
]
CORE_CLASSES = [
    "Lorg/minicpmvedge/core/Slicing;",
    "Lorg/minicpmvedge/core/PromptBuilder;",
    "Lorg/minicpmvedge/core/PromptSegment$Slice;",
    "Lorg/minicpmvedge/core/Exif;",
    "Lorg/minicpmvedge/core/ImageResize;",
    "Lorg/minicpmvedge/core/BundleManifest;",
    "Lorg/minicpmvedge/core/DeviceReportBuilder;",
]


def _load_build_apk():
    spec = importlib.util.spec_from_file_location("build_apk", BUILD_APK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def build_apk():
    return _load_build_apk()


@pytest.fixture(scope="session")
def sdk(build_apk):
    return build_apk.android_apk_toolchain.ensure()


@pytest.fixture(scope="session")
def apk_build(tmp_path_factory, sdk):
    out = tmp_path_factory.mktemp("android-apk")
    done = subprocess.run(
        [sys.executable, str(BUILD_APK), "--out", str(out)], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, f"build-apk.py failed:\n{done.stderr[-8000:]}"
    apk = Path(done.stdout.strip().splitlines()[-1])
    assert apk == out / "app.apk" and apk.is_file()
    return out


@pytest.fixture(scope="session")
def dexdump(apk_build, sdk):
    done = subprocess.run(
        [sdk["dexdump"], "-d", str(apk_build / "app.apk")], capture_output=True, text=True, check=True
    )
    return done.stdout


def test_apk_signature_verifies(apk_build, sdk):
    done = subprocess.run(
        [sdk["apksigner"], "verify", "-v", str(apk_build / "app.apk")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Verifies")
    assert "Verified using v2 scheme (APK Signature Scheme v2): true" in done.stdout


def test_badging_names_launchable_main_activity(apk_build, sdk):
    out = subprocess.run(
        [sdk["aapt"], "dump", "badging", str(apk_build / "app.apk")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"package: name='{PACKAGE}' versionCode='1' versionName='0.1.0'" in out
    assert f"launchable-activity: name='{PACKAGE}.MainActivity'" in out
    assert "sdkVersion:'23'" in out
    assert "uses-permission" not in out  # pickers and a granted content URI: no permissions
    assert "zh-CN" in out  # the Chinese strings are packaged


def test_dex_holds_app_and_core_but_not_the_stub(dexdump):
    defined = set(re.findall(r"Class descriptor\s+: '([^']+)'", dexdump))
    missing = [c for c in APP_CLASSES + CORE_CLASSES if c not in defined]
    assert not missing, f"classes missing from the dex: {missing}"
    stub = sorted(c for c in defined if c.startswith("Lorg/pytorch/"))
    assert not stub, f"the compile-only ExecuTorch stub was packaged: {stub}"
    # ... yet the adapter does call LlmModule (resolved at run time from the real AAR)
    for ref in (
        "Lorg/pytorch/executorch/extension/llm/LlmModule;.prefillImages:(Ljava/nio/ByteBuffer;III)V",
        "Lorg/pytorch/executorch/extension/llm/LlmModule;.prefillPrompt:(Ljava/lang/String;)V",
        "Lorg/pytorch/executorch/extension/llm/LlmModule;.generate:(Ljava/lang/String;"
        "Lorg/pytorch/executorch/extension/llm/LlmGenerationConfig;"
        "Lorg/pytorch/executorch/extension/llm/LlmCallback;)V",
        "Lorg/pytorch/executorch/extension/llm/LlmModule;.resetContext:()V",
    ):
        assert ref in dexdump, f"the dex does not call {ref}"


def test_dex_is_api23_clean(dexdump):
    # dx at min-sdk 23 would have refused invokedynamic; the backport pass must leave no Java 8
    # boxed hashCode statics (Android API 24) behind.
    assert "invoke-custom" not in dexdump
    leftovers = re.findall(
        r"Ljava/lang/(?:Integer|Long|Float|Double|Boolean);\.hashCode:\([IJFDZ]\)I", dexdump
    )
    assert not leftovers, leftovers
    assert "Lorg/minicpmvedge/backport/Java8Statics;.hashCode:(I)I" in dexdump


def test_stub_matches_committed_signatures(apk_build, build_apk):
    actual = build_apk.stub_signatures(apk_build / "stubs" / "classes")
    expected = build_apk.expected_signatures()
    assert build_apk.signature_diff(actual, expected) == []
    # the comparison is not vacuous: a changed parameter type or a dropped member is reported
    changed = [line.replace("prefillImages(java.nio.ByteBuffer", "prefillImages(int[]") for line in expected]
    assert build_apk.signature_diff(actual, changed) == [
        "-  public final void prefillImages(int[], int, int, int);",
        "+  public final void prefillImages(java.nio.ByteBuffer, int, int, int);",
    ]
    assert build_apk.signature_diff(actual[:-3], expected)
    assert any("LlmModule(int, java.lang.String, java.lang.String, float)" in line for line in expected)


def test_backport_retargets_only_boxed_hashcode(apk_build, build_apk):
    size2 = (apk_build / "core-classes" / "org" / "minicpmvedge" / "core" / "Size2.class").read_bytes()
    patched, n = build_apk.retarget_backports(size2)
    assert n >= 1
    again, m = build_apk.retarget_backports(patched)
    assert m == 0 and again == patched  # idempotent: nothing left to retarget
    tmp = apk_build / "backport-check" / "org" / "minicpmvedge" / "core"
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "Size2.class").write_bytes(patched)
    code = subprocess.run(
        ["javap", "-c", "-p", "-cp", str(apk_build / "backport-check"), "org.minicpmvedge.core.Size2"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "org/minicpmvedge/backport/Java8Statics.hashCode:(I)I" in code
    assert "java/lang/Integer.hashCode:(I)I" not in code
    assert "java/lang/Integer.valueOf:(I)Ljava/lang/Integer;" in code  # the shared Class entry is untouched
