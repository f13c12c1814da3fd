package org.minicpmvedge.core

/*
 * Prompt layout for one chat turn, a port of edge_runtime/processing/prompt.py for the MiniCPM-V
 * 4.6 family: render the chat template (optional system message, one user turn of images then
 * text, the assistant generation prompt), then replace the i-th image token the template wrote
 * with the i-th image's expanded placeholder (`<image_id>i</image_id>` prefix when use_image_id).
 *
 * On Android the stock ExecuTorch runner tokenizes, so the result is not ids but [PromptLayout]:
 * text segments and, between them, one [PromptSegment.Slice] per image slice, where the runner
 * places that slice's image features (`tokens` positions). Each slice is bounded by special tokens
 * (`<image>`/`</image>`, `<slice>`/`</slice>`), so tokenizing the text segments one by one gives
 * the same ids as tokenizing the joined text. [PromptLayout.promptText] is that joined text, with
 * `<|image_pad|>` x tokens for each slice: the reference's prompt text exactly.
 *
 * No Jinja runs here. The template is described by a [ChatFormat] (the literal pieces it writes);
 * [ChatFormat.fromTemplate] derives it from the bundle's chat_template.jinja by checking that the
 * template contains each piece, and refuses a template it does not recognise rather than guess.
 */

/** Token counts of one image: its downsampled source view and, if sliced, its tiles (row-major). */
data class ImageLayout(
    val sourceTokens: Int,
    /** (rows, cols) of tiles, or null when not sliced. */
    val grid: Size2?,
    /** One count per tile, row-major; empty when not sliced. */
    val tileTokens: List<Int>,
) {
    init {
        require(sourceTokens > 0 && tileTokens.all { it > 0 }) {
            "image token counts must be positive: source $sourceTokens, tiles $tileTokens"
        }
        val expected = if (grid == null) 0 else grid.h * grid.w
        require(tileTokens.size == expected) { "image grid $grid needs $expected tile token counts, got ${tileTokens.size}" }
    }

    /** Slices of this image: the source view, then the tiles. */
    val sliceCount: Int get() = 1 + tileTokens.size
}

/** The MiniCPM-V processor's named tokens (tokenizer_config.json `extra_special_tokens`). */
data class SpecialTokens(
    val imageToken: String = "<|image_pad|>",
    val videoToken: String = "<|video_pad|>",
    val imageStart: String = "<image>",
    val imageEnd: String = "</image>",
    val sliceStart: String = "<slice>",
    val sliceEnd: String = "</slice>",
    val imageIdStart: String = "<image_id>",
    val imageIdEnd: String = "</image_id>",
) {
    companion object {
        /** From tokenizer_config.json: `extra_special_tokens` overrides the 4.6 checkpoint's defaults. */
        fun fromTokenizerConfig(json: JsonValue): SpecialTokens {
            val extra = json.obj("tokenizer_config").opt("extra_special_tokens")?.obj("extra_special_tokens") ?: return SpecialTokens()
            val d = SpecialTokens()

            fun get(
                key: String,
                default: String,
            ): String {
                val v = extra.opt(key) ?: return default
                return if (v is JsonObject) v.req("content").str("$key.content") else v.str(key)
            }
            return SpecialTokens(
                get("image_token", d.imageToken),
                get("video_token", d.videoToken),
                get("image_start_token", d.imageStart),
                get("image_end_token", d.imageEnd),
                get("slice_start_token", d.sliceStart),
                get("slice_end_token", d.sliceEnd),
                get("image_id_start_token", d.imageIdStart),
                get("image_id_end_token", d.imageIdEnd),
            )
        }
    }
}

/** What the chat template writes around one turn. */
data class ChatFormat(
    /** Before a system message's content. */
    val systemPrefix: String,
    /** Before a user message's content. */
    val userPrefix: String,
    /** After any message's content. */
    val turnSuffix: String,
    /** The assistant generation prompt (add_generation_prompt, enable_thinking false). */
    val generationPrompt: String,
    /** The same with enable_thinking true. */
    val generationPromptThinking: String,
    /** What the template writes for one image item (expanded afterwards). */
    val imageItem: String,
    /** Whether the template trims each message's content (Jinja `| trim`, Python str.strip()). */
    val trimContent: Boolean,
) {
    companion object {
        private const val IM_START = "<|im_start|>"
        private const val IM_END = "<|im_end|>"
        private const val NO_THINK = "<think>\n\n</think>\n\n"
        private const val THINK = "<think>\n"

        /** A Jinja string literal writes a newline as backslash-n. */
        private fun lit(s: String): String = s.replace("\n", "\\n")

        /** MiniCPM-V 4.6's ChatML format (what [fromTemplate] returns for its template). */
        fun minicpmV46(imageToken: String = "<|image_pad|>"): ChatFormat =
            ChatFormat(
                systemPrefix = IM_START + "system\n",
                userPrefix = IM_START + "user\n",
                turnSuffix = IM_END + "\n",
                generationPrompt = IM_START + "assistant\n" + NO_THINK,
                generationPromptThinking = IM_START + "assistant\n" + THINK,
                imageItem = imageToken,
                trimContent = true,
            )

        /**
         * The ChatFormat of a bundle's chat_template.jinja, recognised by the literal pieces it must
         * contain; throws when it is not the MiniCPM-V 4.6 ChatML template.
         */
        fun fromTemplate(
            template: String,
            imageToken: String = "<|image_pad|>",
        ): ChatFormat {
            val required =
                listOf(
                    "render_content(message.content) | trim",
                    "'$IM_START' + message.role + '${lit("\n")}' + content + '${lit(IM_END + "\n")}'",
                    "message.role in ['system', 'user']",
                    "{{- '${lit(IM_START + "assistant\n")}' }}",
                    "{{- '${lit(NO_THINK)}' }}",
                    "{{- '${lit(THINK)}' }}",
                    "{{- '$imageToken' }}",
                    "{{- item.text }}",
                )
            val missing = required.filter { !template.contains(it) }
            if (missing.isNotEmpty()) {
                throw IllegalArgumentException(
                    "unsupported chat template (not the MiniCPM-V 4.6 ChatML template); it lacks: " + missing.joinToString(" | "),
                )
            }
            return minicpmV46(imageToken)
        }
    }
}

/** One piece of a prompt, in order. */
sealed interface PromptSegment {
    /** Text the runner tokenizes (special tokens written in it become their ids). */
    data class Text(
        val text: String,
    ) : PromptSegment

    /** The place of one image slice's features: [tokens] positions (slice 0 = the source view). */
    data class Slice(
        val imageIndex: Int,
        val sliceIndex: Int,
        val tokens: Int,
    ) : PromptSegment
}

/** A prompt as text segments with image slices between them. */
class PromptLayout(
    val segments: List<PromptSegment>,
    /** What one image feature position is written as in the prompt text (`<|image_pad|>`). */
    val imageToken: String,
) {
    /** The slices in prompt order (image by image, source view first). */
    val slices: List<PromptSegment.Slice> get() = segments.filterIsInstance<PromptSegment.Slice>()

    /** The whole prompt text: text segments joined with [imageToken] x tokens for each slice. */
    fun promptText(): String {
        val out = StringBuilder()
        for (s in segments) {
            when (s) {
                is PromptSegment.Text -> out.append(s.text)
                is PromptSegment.Slice -> repeat(s.tokens) { out.append(imageToken) }
            }
        }
        return out.toString()
    }
}

/** Python's str.isspace() characters (what Jinja's trim strips; not the same as Kotlin's isWhitespace). */
private fun isPySpace(c: Char): Boolean {
    val x = c.code
    return x in 0x09..0x0d || x in 0x1c..0x20 || x == 0x85 || x == 0xa0 || x == 0x1680 || x in 0x2000..0x200a ||
        x == 0x2028 || x == 0x2029 || x == 0x202f || x == 0x205f || x == 0x3000
}

/** Python str.strip() with no argument. */
fun pyStrip(s: String): String {
    var start = 0
    var end = s.length
    while (start < end && isPySpace(s[start])) start++
    while (end > start && isPySpace(s[end - 1])) end--
    return s.substring(start, end)
}

/** Turns one user turn (images, then text) plus per-image token layouts into a [PromptLayout]. */
class PromptBuilder(
    val format: ChatFormat,
    val tokens: SpecialTokens = SpecialTokens(),
    val useImageId: Boolean = true,
    val enableThinking: Boolean = false,
) {
    /** The chat template rendered with its image items unexpanded. */
    fun renderTemplate(
        text: String,
        imageCount: Int,
        system: String? = null,
    ): String {
        val f = format
        val out = StringBuilder()
        if (system != null) out.append(f.systemPrefix).append(content(system)).append(f.turnSuffix)
        val user = StringBuilder()
        repeat(imageCount) { user.append(f.imageItem) }
        user.append(text)
        out.append(f.userPrefix).append(content(user.toString())).append(f.turnSuffix)
        out.append(if (enableThinking) f.generationPromptThinking else f.generationPrompt)
        return out.toString()
    }

    /** The prompt of one user turn: [images] in order, then [text]; an optional system message first. */
    fun build(
        text: String,
        images: List<ImageLayout> = emptyList(),
        system: String? = null,
    ): PromptLayout {
        val rendered = renderTemplate(text, images.size, system)
        val pad = tokens.imageToken
        val nImages = countOf(rendered, pad)
        val nVideos = countOf(rendered, tokens.videoToken)
        if (nImages != images.size || nVideos != 0) {
            throw IllegalArgumentException(
                "prompt has $nImages image and $nVideos video placeholders for ${images.size} images and 0 videos " +
                    "(does the text contain $pad or ${tokens.videoToken}?)",
            )
        }
        val pieces = splitOn(rendered, pad)
        val segments = ArrayList<PromptSegment>()
        val buf = StringBuilder(pieces[0])

        fun slice(
            imageIndex: Int,
            sliceIndex: Int,
            count: Int,
        ) {
            if (buf.isNotEmpty()) segments.add(PromptSegment.Text(buf.toString()))
            buf.setLength(0)
            segments.add(PromptSegment.Slice(imageIndex, sliceIndex, count))
        }
        images.forEachIndexed { i, layout ->
            if (useImageId) buf.append(tokens.imageIdStart).append(i).append(tokens.imageIdEnd)
            buf.append(tokens.imageStart)
            slice(i, 0, layout.sourceTokens)
            buf.append(tokens.imageEnd)
            val grid = layout.grid
            if (grid != null) {
                for (r in 0 until grid.h) {
                    if (r > 0) buf.append('\n')
                    for (c in 0 until grid.w) {
                        val k = r * grid.w + c
                        buf.append(tokens.sliceStart)
                        slice(i, 1 + k, layout.tileTokens[k])
                        buf.append(tokens.sliceEnd)
                    }
                }
            }
            buf.append(pieces[i + 1])
        }
        if (buf.isNotEmpty()) segments.add(PromptSegment.Text(buf.toString()))
        return PromptLayout(segments, pad)
    }

    private fun content(s: String): String = if (format.trimContent) pyStrip(s) else s

    /** `text.split(token)` without kotlin-stdlib's split, which dx cannot dex at API 23 (invokedynamic). */
    private fun splitOn(
        text: String,
        token: String,
    ): List<String> {
        val out = ArrayList<String>()
        var start = 0
        var at = text.indexOf(token)
        while (at >= 0) {
            out.add(text.substring(start, at))
            start = at + token.length
            at = text.indexOf(token, start)
        }
        out.add(text.substring(start))
        return out
    }

    private fun countOf(
        text: String,
        token: String,
    ): Int {
        var n = 0
        var at = text.indexOf(token)
        while (at >= 0) {
            n++
            at = text.indexOf(token, at + token.length)
        }
        return n
    }

    companion object {
        /** A builder for a bundle: its chat_template.jinja text, tokenizer_config.json and use_image_id. */
        fun fromTemplate(
            chatTemplate: String,
            tokens: SpecialTokens = SpecialTokens(),
            useImageId: Boolean = true,
            enableThinking: Boolean = false,
        ): PromptBuilder = PromptBuilder(ChatFormat.fromTemplate(chatTemplate, tokens.imageToken), tokens, useImageId, enableThinking)
    }
}
