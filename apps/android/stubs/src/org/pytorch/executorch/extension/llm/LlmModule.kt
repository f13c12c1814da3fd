/*
 * COMPILE-ONLY STUB: not the ExecuTorch library, never packaged into the APK.
 *
 * The APK build here (apps/android/tools/build-apk.py) compiles the app against this file instead of
 * the org.pytorch:executorch-android AAR, which lives only on Maven Central (not reachable from the
 * build machines). The Gradle build uses the real AAR and never sees this directory. The stub is
 * passed to ProGuard as a library jar (not an input jar), and tests/test_android_apk.py checks that
 * dexdump lists none of its classes in the APK.
 *
 * Every declaration below is one the app calls, with the signature of
 *   pytorch/executorch extension/android/executorch_android/src/main/java/org/pytorch/executorch/
 *   extension/llm/LlmModule.kt
 * at commit cff6f4dd32e630945b7188512c1f2b4f102b05ad (main, version.txt 1.5.0, 2026-08-22), and
 * unchanged at tag v1.4.1 (e4d02f41f7909e8ed5bf4a14ffc520d733453d9f). The commit of executorch 1.5.1
 * (3b60683923245cf472b7323426920e15623ba361, the git_version of the installed Python package) was not
 * in the snapshot that was read. apps/android/stubs/signatures.txt lists the compiled signatures
 * (javap -public) and tests/test_android_apk.py checks the stub against it. Upstream's annotations
 * (@Experimental, @DoNotStrip) are left out: they change no signature.
 */
package org.pytorch.executorch.extension.llm

import java.io.Closeable
import java.nio.ByteBuffer

class LlmModule(
    modelType: Int,
    modulePath: String,
    tokenizerPath: String,
    temperature: Float,
) : Closeable {
    override fun close(): Unit = throw UnsupportedOperationException(STUB)

    fun generate(
        prompt: String,
        config: LlmGenerationConfig,
        llmCallback: LlmCallback,
    ): Unit = throw UnsupportedOperationException(STUB)

    fun prefillImages(
        image: ByteBuffer,
        width: Int,
        height: Int,
        channels: Int,
    ): Unit = throw UnsupportedOperationException(STUB)

    fun prefillPrompt(prompt: String): Unit = throw UnsupportedOperationException(STUB)

    fun resetContext(): Unit = throw UnsupportedOperationException(STUB)

    fun stop(): Unit = throw UnsupportedOperationException(STUB)

    fun load(): Unit = throw UnsupportedOperationException(STUB)

    companion object {
        const val MODEL_TYPE_TEXT = 1
        const val MODEL_TYPE_TEXT_VISION = 2
        const val MODEL_TYPE_MULTIMODAL = 2
    }
}

private const val STUB = "compile-only stub of ExecuTorch's LlmModule"
