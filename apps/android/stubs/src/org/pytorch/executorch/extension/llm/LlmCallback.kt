/*
 * COMPILE-ONLY STUB: not the ExecuTorch library, never packaged into the APK (see LlmModule.kt here).
 *
 * Signatures of pytorch/executorch extension/android/executorch_android/src/main/java/org/pytorch/
 * executorch/extension/llm/LlmCallback.kt at commit cff6f4dd32e630945b7188512c1f2b4f102b05ad (main,
 * version.txt 1.5.0), unchanged at tag v1.4.1 (e4d02f41f7909e8ed5bf4a14ffc520d733453d9f). Upstream
 * compiles it with -Xjvm-default=all, so onStats and onError are JVM default methods; the app
 * overrides all three anyway.
 */
package org.pytorch.executorch.extension.llm

interface LlmCallback {
    fun onResult(result: String)

    fun onStats(stats: String) {}

    fun onError(
        errorCode: Int,
        message: String,
    ) {}
}
