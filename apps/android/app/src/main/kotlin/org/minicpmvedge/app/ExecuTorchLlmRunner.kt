package org.minicpmvedge.app

import org.minicpmvedge.core.ImagePixels
import org.minicpmvedge.core.Json
import org.minicpmvedge.core.JsonNumber
import org.minicpmvedge.core.JsonObject
import org.minicpmvedge.core.PreparedImage
import org.minicpmvedge.core.PromptSegment
import org.pytorch.executorch.extension.llm.LlmCallback
import org.pytorch.executorch.extension.llm.LlmGenerationConfig
import org.pytorch.executorch.extension.llm.LlmModule
import java.nio.ByteBuffer

/**
 * [Runner] over ExecuTorch's stock LLM runner, `org.pytorch.executorch.extension.llm.LlmModule`
 * (executorch-android; the C++ MultimodalRunner behind JNI). One turn is:
 *
 *  1. `resetContext()`: position 0, so the program starts from a clean state;
 *  2. for each segment but the last: text -> `prefillPrompt(text)` (the runner tokenizes; the slice
 *     tags are special tokens in that text), slice -> `prefillImages(pixels, w, h, 3)` with the
 *     slice's uint8 RGB pixels in CHW order, which the runner feeds to the program's vision method
 *     and places in the context;
 *  3. `generate(lastText, config, callback)`: prefills the generation prompt and decodes, streaming
 *     UTF-8-complete pieces to `onResult` and its statistics JSON to `onStats`.
 *
 * In this repository's offline APK build the ExecuTorch classes come from a compile-only stub
 * (apps/android/stubs, checked against the upstream sources and kept out of the APK); the Gradle
 * build links the real AAR.
 */
class ExecuTorchLlmRunner : Runner {
    private var module: LlmModule? = null

    override fun load(bundle: BundleInfo) {
        close()
        val m =
            LlmModule(
                LlmModule.MODEL_TYPE_MULTIMODAL,
                bundle.pteFile.absolutePath,
                bundle.tokenizerFile.absolutePath,
                0f,
            )
        try {
            m.load()
        } catch (e: RuntimeException) {
            m.close()
            throw e
        }
        module = m
    }

    override fun generate(
        segments: List<PromptSegment>,
        images: List<PreparedImage>,
        config: GenerationConfig,
        callback: RunnerCallback,
    ): RunStats {
        val m = module ?: throw IllegalStateException("no bundle loaded")
        val last =
            segments.lastOrNull() as? PromptSegment.Text
                ?: throw IllegalArgumentException("a prompt ends with its generation prompt text")
        val start = System.nanoTime()
        m.resetContext()
        var imageMs = 0.0
        var textMs = 0.0
        for (segment in segments.subList(0, segments.size - 1)) {
            val t0 = System.nanoTime()
            when (segment) {
                is PromptSegment.Text -> {
                    m.prefillPrompt(segment.text)
                    textMs += msSince(t0)
                }

                is PromptSegment.Slice -> {
                    val pixels = images[segment.imageIndex].slices[segment.sliceIndex].pixels
                    m.prefillImages(chwBytes(pixels), pixels.width, pixels.height, 3)
                    imageMs += msSince(t0)
                }
            }
        }
        val listener = Listener(m, config.maxNewTokens, callback, start)
        val genConfig =
            LlmGenerationConfig
                .create()
                .echo(false)
                .seqLen(-1) // the program's max_context bounds the turn; maxNewTokens is enforced by Listener
                .temperature(config.temperature)
                .build()
        m.generate(last.text, genConfig, listener)
        listener.error?.let { throw IllegalStateException("ExecuTorch runner: $it") }
        return listener.stats(imageMs, textMs)
    }

    override fun stop() {
        module?.stop()
    }

    override fun reset() {
        module?.resetContext()
    }

    override fun close() {
        module?.close()
        module = null
    }

    /** Receives the runner's callbacks on the generating thread. */
    private class Listener(
        private val module: LlmModule,
        private val maxPieces: Int,
        private val callback: RunnerCallback,
        private val start: Long,
    ) : LlmCallback {
        var pieces = 0
        var firstPieceAt = 0L
        var lastPieceAt = 0L
        var statsJson: String? = null
        var error: String? = null

        override fun onResult(result: String) {
            val now = System.nanoTime()
            if (pieces == 0) firstPieceAt = now
            lastPieceAt = now
            pieces++
            callback.onPiece(result)
            if (pieces >= maxPieces) module.stop()
        }

        override fun onStats(stats: String) {
            statsJson = stats
        }

        override fun onError(
            errorCode: Int,
            message: String,
        ) {
            error = "error $errorCode: $message"
        }

        fun stats(
            imageMs: Double,
            textMs: Double,
        ): RunStats {
            val runner = statsJson?.let { parseStats(it) }
            val firstMs = if (pieces == 0) Double.NaN else (firstPieceAt - start) / 1e6
            val ownRate = if (pieces >= 2) (pieces - 1) * 1e9 / (lastPieceAt - firstPieceAt) else 0.0
            return RunStats(
                imagePrefillMs = imageMs,
                textPrefillMs = textMs,
                firstPieceMs = firstMs,
                generatedTokens = runner?.generated ?: pieces,
                decodeTokS = runner?.decodeTokS ?: ownRate,
                promptTokens = runner?.prompt ?: -1,
                runnerStatsJson = statsJson,
            )
        }
    }

    private class RunnerNumbers(
        val prompt: Int,
        val generated: Int,
        val decodeTokS: Double?,
    )

    companion object {
        private fun msSince(t0: Long): Double = (System.nanoTime() - t0) / 1e6

        /** The slice's uint8 RGB in CHW order (the core's toChw) as the direct buffer LlmModule.prefillImages takes. */
        fun chwBytes(pixels: ImagePixels): ByteBuffer {
            val chw = pixels.toChw()
            return ByteBuffer.allocateDirect(chw.size).put(chw).apply { flip() }
        }

        /**
         * The runner's statistics (extension/llm/runner/stats.h, stats_to_json_string): token counts
         * and millisecond timestamps; decode rate from the first token to the end of inference.
         */
        private fun parseStats(json: String): RunnerNumbers? {
            val o = runCatching { Json.parse(json) as? JsonObject }.getOrNull() ?: return null

            fun num(key: String): Double? = (o.fields[key] as? JsonNumber)?.toDouble()
            val generated = num("generated_tokens")?.toInt() ?: return null
            val prompt = num("prompt_tokens")?.toInt() ?: -1
            val first = num("first_token_ms")
            val end = num("inference_end_ms")
            val rate =
                if (generated >= 2 && first != null && end != null && end > first) {
                    (generated - 1) * 1000.0 / (end - first)
                } else {
                    null
                }
            return RunnerNumbers(prompt, generated, rate)
        }
    }
}
