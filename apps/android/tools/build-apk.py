#!/usr/bin/env python3
"""Build the Android app into a signed APK offline, without Gradle: build/android/app.apk.

The Gradle build (Android Studio) needs AGP, AndroidX and the executorch-android AAR from Google
Maven / Maven Central, none of which the build machines here can reach. This script builds the
same sources with what they can reach (recipe: shared/design/native-toolchains.md, section 2):

  stubs   kotlinc apps/android/stubs/src -> stubs.jar: the COMPILE-ONLY stub of the few ExecuTorch
          LlmModule signatures the app calls; a library jar below, never packaged
  core    kotlinc apps/android/core/src/main/kotlin against android.jar API 23 (-no-jdk), so the
          core may only use JDK classes that exist on Android 6.0
  aapt    aapt package: resources, R.java, the manifest (package, versions and SDK levels taken
          from app/build.gradle.kts, as AGP would insert them)
  app     kotlinc app/src/main/kotlin + R.java against android.jar, core and the stub; javac R.java
  shrink  ProGuard: app + core + kotlin-stdlib in, android.jar + stubs.jar as library jars (so the
          stub stays out), app/proguard-rules.pro included, warnings in our code are errors
  dex     dx (dalvik-exchange from bullseye) --min-sdk-version=23
  apk     aapt add classes.dex, zipalign -p 4, apksigner sign with a debug keystore generated
          into build/android/ (never committed), apksigner verify, aapt dump badging

Kotlin is compiled with -Xlambdas=class -Xsam-conversions=class (dx at API 23 has no
invokedynamic) and -jvm-default=disable (no default interface methods before API 24); the Gradle
build desugars both with D8 instead.

Tools: tools/android_toolchain.py (kotlinc, ktlint: helper scripts shared with the core's JVM
tests) and tools/android_apk_toolchain.py (android.jar, dx, aapt, zipalign, apksigner, dexdump,
proguard). Prints the APK path; exit 0 on success, 1 on a failed step (its output is shown), 2 on
a missing tool. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ANDROID = Path(__file__).resolve().parent.parent
REPO = ANDROID.parent.parent
sys.path.insert(0, str(REPO / "tools"))

import android_apk_toolchain  # noqa: E402
import android_toolchain  # noqa: E402
from toolchain_cache import ToolchainError  # noqa: E402

APP = ANDROID / "app"
CORE_SRC = ANDROID / "core" / "src" / "main" / "kotlin"
STUB_SRC = ANDROID / "stubs" / "src"
SIGNATURES = ANDROID / "stubs" / "signatures.txt"
BACKPORT_SRC = ANDROID / "tools" / "backport"
BACKPORT_CLASS = "org/minicpmvedge/backport/Java8Statics"
# java/lang/<Box>.hashCode(<prim>)I: Java 8 statics (Android API 24) that Kotlin data classes call
BACKPORTS = {
    ("java/lang/Integer", "(I)I"),
    ("java/lang/Long", "(J)I"),
    ("java/lang/Float", "(F)I"),
    ("java/lang/Double", "(D)I"),
    ("java/lang/Boolean", "(Z)I"),
    ("java/lang/Short", "(S)I"),
    ("java/lang/Byte", "(B)I"),
    ("java/lang/Character", "(C)I"),
}
# The stub's companion object refers to kotlin-stdlib's DefaultConstructorMarker, a program class
# here: harmless, the stub is not packaged.
AUDIT_ALLOWED = r"Warning: library class org\.pytorch\.executorch\.\S+ depends on program class kotlin\."
KOTLIN_FLAGS = [
    "-jvm-target",
    "1.8",
    "-no-jdk",
    "-no-reflect",
    "-Xlambdas=class",
    "-Xsam-conversions=class",
    "-jvm-default=disable",
    "-Werror",
]
KEY_PASS = "android"


class StepError(Exception):
    pass


def gradle_value(key: str, text: str) -> str:
    m = re.search(rf"\b{key}\s*=\s*(\"([^\"]*)\"|\d+)", text)
    if m is None:
        raise StepError(f"app/build.gradle.kts has no `{key} = ...`")
    return m.group(2) if m.group(2) is not None else m.group(1)


def sources(root: Path, *exts: str) -> list[str]:
    return sorted(str(p) for ext in exts for p in root.rglob(f"*.{ext}")) if root.is_dir() else []


class Builder:
    def __init__(self, out: Path, verbose: bool) -> None:
        self.out = out
        self.verbose = verbose
        self.sdk = android_apk_toolchain.ensure()
        self.kt = android_toolchain.ensure()
        self.android_jar = self.sdk["android_jar"]
        self.timings: dict[str, float] = {}
        self.backports = 0

    def run(self, step: str, cmd: list[str], cwd: Path | None = None) -> str:
        started = time.perf_counter()
        if self.verbose:
            print(f"[{step}] {' '.join(cmd)}", file=sys.stderr)
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
        self.timings[step] = self.timings.get(step, 0.0) + time.perf_counter() - started
        out = (done.stdout + done.stderr).strip()
        if done.returncode != 0:
            raise StepError(
                f"{step}: `{' '.join(cmd[:3])} ...` failed (exit {done.returncode}):\n{out[-6000:]}"
            )
        return out

    def kotlinc(
        self, step: str, srcs: list[str], classpath: list[str], dest: Path, extra: list[str] | None = None
    ) -> None:
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        cp = ":".join([self.android_jar, *classpath])
        self.run(
            step, [str(self.kt.kotlinc), *KOTLIN_FLAGS, *(extra or []), "-cp", cp, "-d", str(dest), *srcs]
        )

    def proguard(
        self, step: str, injars: list[str], outjar: Path, libraries: list[str], rules: list[str]
    ) -> str:
        outjar.unlink(missing_ok=True)
        conf = outjar.with_suffix(".pro")
        lines = [f"-injars {j}" for j in injars] + [f"-outjars {outjar}"]
        lines += [f"-libraryjars {j}" for j in libraries]
        lines += [
            "-dontobfuscate",
            "-dontoptimize",
            "-dontpreverify",
            "-dontnote",
            "-forceprocessing",
            *rules,
        ]
        conf.write_text("\n".join(lines) + "\n")
        return self.run(step, [self.sdk["proguard"], f"@{conf}"])

    def build(self) -> Path:
        out = self.out
        out.mkdir(parents=True, exist_ok=True)
        gradle = (APP / "build.gradle.kts").read_text()
        package = gradle_value("namespace", gradle)
        min_sdk = gradle_value("minSdk", gradle)
        version_code = gradle_value("versionCode", gradle)
        version_name = gradle_value("versionName", gradle)

        # 1. the compile-only stub, as upstream compiles it (-Xjvm-default=all = no-compatibility)
        stub_classes = out / "stubs" / "classes"
        flags = [f for f in KOTLIN_FLAGS if not f.startswith("-jvm-default")]
        shutil.rmtree(stub_classes, ignore_errors=True)
        stub_classes.mkdir(parents=True)
        self.run(
            "stubs",
            [str(self.kt.kotlinc), *flags, "-jvm-default=no-compatibility", "-cp", self.android_jar]
            + ["-d", str(stub_classes), *sources(STUB_SRC, "kt")],
        )
        stubs_jar = out / "stubs" / "stubs.jar"
        jar_dir(stub_classes, stubs_jar)
        diff = signature_diff(stub_signatures(stub_classes), expected_signatures())
        if diff:
            raise StepError(
                f"the compiled stub differs from {SIGNATURES.relative_to(REPO)} (check the upstream "
                "source again before changing either):\n" + "\n".join(diff)
            )

        # 2. the core against android.jar only
        core_classes = out / "core-classes"
        core_srcs = sources(CORE_SRC, "kt")
        if not core_srcs:
            raise StepError(f"no Kotlin sources under {CORE_SRC}")
        self.kotlinc("core", core_srcs, [], core_classes, ["-module-name", "minicpmv-edge-core"])

        # 3. resources, R.java and the manifest
        manifest_src = (APP / "src" / "main" / "AndroidManifest.xml").read_text()
        manifest = re.sub(r"<manifest\b", f'<manifest package="{package}"', manifest_src, count=1)
        (out / "AndroidManifest.xml").write_text(manifest)
        gen = out / "gen"
        shutil.rmtree(gen, ignore_errors=True)
        gen.mkdir()
        unaligned = out / "app.unaligned.apk"
        unaligned.unlink(missing_ok=True)
        self.run(
            "aapt",
            [self.sdk["aapt"], "package", "-f", "-m", "-J", str(gen), "-M", str(out / "AndroidManifest.xml")]
            + ["-S", str(APP / "src" / "main" / "res"), "-I", self.android_jar, "-F", str(unaligned)]
            + ["--min-sdk-version", min_sdk, "--target-sdk-version", "23"]
            + ["--version-code", version_code, "--version-name", version_name],
        )

        # 4. the app: Kotlin (seeing R.java as a Java source), then R.java itself
        app_classes = out / "app-classes"
        main = APP / "src" / "main"
        app_srcs = sources(main / "kotlin", "kt") + sources(main / "java", "kt", "java")
        r_java = sources(gen, "java")
        self.kotlinc(
            "app",
            app_srcs + r_java,
            [str(core_classes), str(stubs_jar)],
            app_classes,
            ["-module-name", "minicpmv-edge-app"],
        )
        java_srcs = r_java + sources(main / "java", "java")
        self.run(
            "javac",
            ["javac", "-source", "8", "-target", "8", "-Xlint:-options", "-bootclasspath", self.android_jar]
            + ["-cp", f"{app_classes}:{core_classes}:{stubs_jar}:{self.kt.kotlin_lib / 'kotlin-stdlib.jar'}"]
            + ["-d", str(app_classes), *java_srcs],
        )

        # 5. ProGuard: shrink kotlin-stdlib to what app + core use; the stub is a library jar
        stdlib = self.kt.kotlin_lib / "kotlin-stdlib.jar"
        libraries = [self.android_jar, str(stubs_jar), str(self.kt.kotlin_lib / "annotations-13.0.jar")]
        shrunk = out / "shrunk.jar"
        self.proguard(
            "proguard",
            [str(app_classes), str(core_classes), f"{stdlib}(!META-INF/**,!module-info.class)"],
            shrunk,
            libraries,
            [
                # everything of ours goes through dx, not only what the app reaches today
                "-keep class org.minicpmvedge.** { *; }",
                f"-include {APP / 'proguard-rules.pro'}",
                # warnings here include the whole unshrunk kotlin-stdlib: the audit below judges
                # what is left
                "-ignorewarnings",
            ],
        )

        # 6. backport the Java 8 statics Android 6.0 lacks (as D8 would), then audit against API 23
        backport_classes = out / "backport-classes"
        shutil.rmtree(backport_classes, ignore_errors=True)
        backport_classes.mkdir()
        self.run(
            "javac",
            ["javac", "-source", "8", "-target", "8", "-Xlint:-options", "-bootclasspath", self.android_jar]
            + ["-d", str(backport_classes), *sources(BACKPORT_SRC, "java")],
        )
        final = out / "app.jar"
        self.backports = retarget_jar(shrunk, final, backport_classes)
        audit = self.proguard(
            "audit", [str(final)], out / "audit.jar", libraries, ["-keep class ** { *; }", "-ignorewarnings"]
        )
        problems = [
            line
            for line in audit.splitlines()
            if line.startswith("Warning: ")
            and not line.startswith("Warning: there were ")
            and not re.match(AUDIT_ALLOWED, line)
        ]
        if problems:
            raise StepError(
                "the APK's code refers to classes or members that Android API 23 lacks (a D8 build would "
                "desugar some of them; dx cannot). Avoid the calls in app/core code (kotlin-stdlib functions "
                "whose bodies use invokedynamic show up as java.lang.invoke references):\n"
                + "\n".join(sorted(set(problems)))
            )

        # 7. dex
        dex_dir = out / "dex"
        shutil.rmtree(dex_dir, ignore_errors=True)
        dex_dir.mkdir()
        self.run(
            "dx",
            ["java", "-cp", self.sdk["dx_jar"], "com.android.dx.command.Main", "--dex"]
            + [f"--min-sdk-version={min_sdk}", f"--output={dex_dir / 'classes.dex'}", str(final)],
        )

        # 8. package, align, sign, verify
        self.run("aapt", [self.sdk["aapt"], "add", str(unaligned), "classes.dex"], cwd=dex_dir)
        aligned = out / "app.aligned.apk"
        self.run("zipalign", [self.sdk["zipalign"], "-f", "-p", "4", str(unaligned), str(aligned)])
        keystore = out / "debug.jks"
        if not keystore.is_file():
            self.run(
                "keytool",
                [
                    "keytool",
                    "-genkeypair",
                    "-keystore",
                    str(keystore),
                    "-storepass",
                    KEY_PASS,
                    "-keypass",
                    KEY_PASS,
                ]
                + ["-alias", "debug", "-keyalg", "RSA", "-keysize", "2048", "-validity", "10000"]
                + ["-dname", "CN=minicpmv-edge debug"],
            )
        apk = out / "app.apk"
        apk.unlink(missing_ok=True)
        self.run(
            "apksigner",
            [self.sdk["apksigner"], "sign", "--ks", str(keystore), "--ks-pass", f"pass:{KEY_PASS}"]
            + ["--key-pass", f"pass:{KEY_PASS}", "--out", str(apk), str(aligned)],
        )
        verify = self.run("verify", [self.sdk["apksigner"], "verify", "-v", str(apk)])
        if not verify.startswith("Verifies"):
            raise StepError(f"apksigner verify did not say Verifies:\n{verify}")
        badging = self.run("badging", [self.sdk["aapt"], "dump", "badging", str(apk)])
        want = f"launchable-activity: name='{package}.MainActivity'"
        if want not in badging:
            raise StepError(f"aapt dump badging lacks {want!r}:\n{badging}")
        (out / "build-info.json").write_text(
            json.dumps(
                {
                    "apk": str(apk),
                    "package": package,
                    "min_sdk": int(min_sdk),
                    "android_jar": self.android_jar,
                    "kotlinc": str(self.kt.kotlinc),
                    "stubs_jar": str(stubs_jar),
                    "backported_calls": self.backports,
                    "seconds": {k: round(v, 2) for k, v in self.timings.items()},
                },
                indent=2,
            )
            + "\n"
        )
        return apk


def stub_signatures(classes: Path) -> list[str]:
    """`javap -public` of every class under classes, sorted by name, without "Compiled from" lines."""
    names = sorted(
        p.relative_to(classes).with_suffix("").as_posix().replace("/", ".") for p in classes.rglob("*.class")
    )
    done = subprocess.run(
        ["javap", "-public", "-cp", str(classes), *names], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise StepError(f"javap failed:\n{done.stderr}")
    return [
        line for line in done.stdout.splitlines() if line.strip() and not line.startswith("Compiled from")
    ]


def expected_signatures() -> list[str]:
    """apps/android/stubs/signatures.txt without its # comment lines."""
    return [line for line in SIGNATURES.read_text().splitlines() if line.strip() and not line.startswith("#")]


def signature_diff(actual: list[str], expected: list[str]) -> list[str]:
    """Lines only in the compiled stub (+) or only in the committed list (-); empty when equal."""
    if actual == expected:
        return []
    import difflib

    return [
        line
        for line in difflib.unified_diff(
            expected, actual, "signatures.txt", "compiled stub", lineterm="", n=0
        )
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ] or ["(same lines, different order)"]


def retarget_backports(data: bytes) -> tuple[bytes, int]:
    """Point a class file's Methodrefs java/lang/<Box>.hashCode(<prim>)I at BACKPORT_CLASS.

    Appends a Utf8 and a Class entry to the constant pool and rewrites the class_index of each
    matching Methodref; nothing else in the class refers to those two new entries, so every other
    index stays valid. Returns the new bytes and the number of Methodrefs changed.
    """
    if data[:4] != b"\xca\xfe\xba\xbe":
        raise StepError("not a class file")

    def u2(at: int) -> int:
        return int.from_bytes(data[at : at + 2], "big")

    count = u2(8)
    pos = 10
    utf8: dict[int, bytes] = {}
    classes: dict[int, int] = {}
    nats: dict[int, tuple[int, int]] = {}
    methodrefs: list[tuple[int, int, int]] = []  # (offset, class index, name-and-type index)
    i = 1
    while i < count:
        tag = data[pos]
        if tag == 1:
            n = u2(pos + 1)
            utf8[i] = data[pos + 3 : pos + 3 + n]
            pos += 3 + n
        elif tag in (3, 4):
            pos += 5
        elif tag in (5, 6):
            pos += 9
            i += 1  # eight-byte constants take two slots
        elif tag in (7, 8, 16, 19, 20):
            if tag == 7:
                classes[i] = u2(pos + 1)
            pos += 3
        elif tag in (9, 10, 11, 12, 17, 18):
            if tag == 10:
                methodrefs.append((pos, u2(pos + 1), u2(pos + 3)))
            elif tag == 12:
                nats[i] = (u2(pos + 1), u2(pos + 3))
            pos += 5
        elif tag == 15:
            pos += 4
        else:
            raise StepError(f"unknown constant pool tag {tag}")
        i += 1
    hits = []
    for at, cls, nat in methodrefs:
        name, desc = nats[nat]
        owner = utf8[classes[cls]].decode()
        if utf8[name] == b"hashCode" and (owner, utf8[desc].decode()) in BACKPORTS:
            hits.append(at)
    if not hits:
        return data, 0
    out = bytearray(data)
    for at in hits:
        out[at + 1 : at + 3] = (count + 1).to_bytes(2, "big")
    name = BACKPORT_CLASS.encode()
    out[pos:pos] = b"\x01" + len(name).to_bytes(2, "big") + name + b"\x07" + count.to_bytes(2, "big")
    out[8:10] = (count + 2).to_bytes(2, "big")
    return bytes(out), len(hits)


def retarget_jar(src: Path, dest: Path, extra_classes: Path) -> int:
    """Copy src to dest with retarget_backports applied to every class, plus extra_classes' files."""
    changed = 0
    dest.unlink(missing_ok=True)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith(".class"):
                data, n = retarget_backports(data)
                changed += n
            zout.writestr(info.filename, data)
        for p in sorted(extra_classes.rglob("*.class")):
            zout.write(p, p.relative_to(extra_classes).as_posix())
    return changed


def jar_dir(classes: Path, jar: Path) -> None:
    """A plain jar (zip) of a class directory, entries in sorted order."""
    jar.unlink(missing_ok=True)
    with zipfile.ZipFile(jar, "w", zipfile.ZIP_DEFLATED) as z:
        for p in sorted(classes.rglob("*")):
            if p.is_file():
                z.write(p, p.relative_to(classes).as_posix())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "build" / "android", help="build directory")
    parser.add_argument("-v", "--verbose", action="store_true", help="print each command")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        apk = Builder(args.out.resolve(), args.verbose).build()
    except ToolchainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except StepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"android apk: {apk} ({apk.stat().st_size} bytes) in {time.perf_counter() - started:.0f} s",
        file=sys.stderr,
    )
    print(apk)
    return 0


if __name__ == "__main__":
    sys.exit(main())
