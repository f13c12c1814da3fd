/*
 * COMPILE-ONLY STUB: not the ExecuTorch library, never packaged into the APK (see LlmModule.kt here).
 *
 * The declarations the app calls, with the signatures of pytorch/executorch
 * extension/android/executorch_android/src/main/java/org/pytorch/executorch/extension/llm/
 * LlmGenerationConfig.kt at commit cff6f4dd32e630945b7188512c1f2b4f102b05ad (main, version.txt 1.5.0),
 * unchanged at tag v1.4.1 (e4d02f41f7909e8ed5bf4a14ffc520d733453d9f). Upstream's Builder has an
 * internal constructor and more setters (maxNewTokens, warming, numBos, numEos); note that
 * LlmModule.generate(String, LlmGenerationConfig, LlmCallback) passes seqLen, echo, temperature,
 * numBos and numEos to the runner, not maxNewTokens.
 */
package org.pytorch.executorch.extension.llm

class LlmGenerationConfig private constructor() {
    companion object {
        @JvmStatic fun create(): Builder = throw UnsupportedOperationException(STUB)
    }

    class Builder internal constructor() {
        fun echo(echo: Boolean): Builder = throw UnsupportedOperationException(STUB)

        fun seqLen(seqLen: Int): Builder = throw UnsupportedOperationException(STUB)

        fun temperature(temperature: Float): Builder = throw UnsupportedOperationException(STUB)

        fun build(): LlmGenerationConfig = throw UnsupportedOperationException(STUB)
    }
}

private const val STUB = "compile-only stub of ExecuTorch's LlmGenerationConfig"
