package org.minicpmvedge.app

import org.minicpmvedge.core.PreparedImage
import org.minicpmvedge.core.PromptSegment
import java.io.Closeable

/**
 * What the app needs from an on-device LLM runner: the app does the slicing and the slice/tag
 * layout (the core), the runner tokenizes, runs the vision encoder and the decoder, samples and
 * streams text. [ExecuTorchLlmRunner] implements it over ExecuTorch's stock LlmModule; nothing in
 * the app runs a decoder loop of its own.
 */
interface Runner : Closeable {
    /** Opens the bundle's program and tokenizer (slow: call off the UI thread). */
    fun load(bundle: BundleInfo)

    /**
     * One chat turn, from a clean context: [segments] in order (the core's PromptLayout), where
     * each [PromptSegment.Slice] names a slice of [images]; streams text pieces to [callback] and
     * returns when generation ends (stop token, [GenerationConfig.maxNewTokens], context full or
     * [stop]). Blocks: call off the UI thread. Throws on a runner error.
     */
    fun generate(
        segments: List<PromptSegment>,
        images: List<PreparedImage>,
        config: GenerationConfig,
        callback: RunnerCallback,
    ): RunStats

    /** Asks a running [generate] to end early; safe from any thread. */
    fun stop()

    /** Clears the runner's context (KV cache, recurrent state, position) for a new chat. */
    fun reset()
}

data class GenerationConfig(
    /** Upper bound on streamed pieces (one per token, fewer when a character spans tokens). */
    val maxNewTokens: Int = 512,
    /** 0 = greedy, as `minicpmv-edge chat --json` decodes by default. */
    val temperature: Float = 0f,
)

fun interface RunnerCallback {
    /** A piece of the answer (valid UTF-8); called on the generating thread. */
    fun onPiece(text: String)
}

/** Timings of one [Runner.generate], all measured inside it (milliseconds from its start). */
data class RunStats(
    /** Sum of the image prefills (vision encoder + their decoder prefill). */
    val imagePrefillMs: Double,
    /** Sum of the text prefills before the last text segment. */
    val textPrefillMs: Double,
    /** From entering generate() to the first streamed piece; NaN when nothing was generated. */
    val firstPieceMs: Double,
    /** Generated tokens as the runner counted them (its stats), else the streamed pieces. */
    val generatedTokens: Int,
    /** Decode rate after the first token, tokens per second; 0 when under 2 tokens. */
    val decodeTokS: Double,
    /** Prompt tokens as the runner counted them; -1 when it did not report. */
    val promptTokens: Int,
    /** The runner's own statistics JSON, when it sent one. */
    val runnerStatsJson: String?,
)
