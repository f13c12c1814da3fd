package org.minicpmvedge.core

/**
 * The device report the app writes after timing runs (docs/bundle.md#device-report), which
 * `minicpmv-edge bench --device-report FILE` checks against the published phone targets.
 * Pure data: the app supplies the device facts and the timed turns, and writes the text.
 */
data class DeviceFacts(
    /** e.g. "Google Pixel 8 Pro" (Build.MANUFACTURER + Build.MODEL). */
    val device: String,
    /** e.g. "14 (API 34)". */
    val osVersion: String,
    val appVersion: String,
)

/** What was timed: the photo, the slicing settings and the decode length. */
data class ReportSettings(
    val image: String,
    val width: Int,
    val height: Int,
    val downsampleMode: String,
    val maxSliceNums: Int,
    val decodeTokens: Int,
)

/**
 * One timed turn. [ttftMs] runs from the image bytes in to the first token out (image decode,
 * preprocessing, vision, prefill and the first sample included); [decodeTokS] is measured over
 * [decodeTokens] decode steps (at least 64 for a report the targets judge). A stage the stock
 * runner does not time separately is null and left out.
 */
data class ReportRun(
    val ttftMs: Double,
    val decodeTokS: Double,
    val decodeTokens: Int,
    val imageDecodeMs: Double? = null,
    val preprocessMs: Double? = null,
    val visionMs: Double? = null,
    val prefillMs: Double? = null,
    val firstSampleMs: Double? = null,
    val peakRssMb: Double? = null,
) {
    init {
        require(ttftMs.isFinite() && ttftMs > 0) { "ttft_ms must be a positive number, got $ttftMs" }
        require(decodeTokS.isFinite() && decodeTokS > 0) {
            "decode_tok_s must be a positive number, got $decodeTokS (a timed run needs decode steps)"
        }
        require(decodeTokens >= 1) { "decode_tokens must be >= 1, got $decodeTokens" }
        for ((name, v) in optionalMetrics()) {
            require(v == null || (v.isFinite() && v >= 0)) { "$name must be a number >= 0, got $v" }
        }
    }

    internal fun optionalMetrics(): List<Pair<String, Double?>> =
        listOf(
            "image_decode_ms" to imageDecodeMs,
            "preprocess_ms" to preprocessMs,
            "vision_ms" to visionMs,
            "prefill_ms" to prefillMs,
            "first_sample_ms" to firstSampleMs,
            "peak_rss_mb" to peakRssMb,
        )
}

class DeviceReportBuilder(
    val family: String,
    val format: String,
    val quantization: String,
    val manifestSha256: String,
    val facts: DeviceFacts,
    val settings: ReportSettings,
    val platform: String = PLATFORM,
) {
    private val runs = ArrayList<ReportRun>()

    /** For a bundle: family, format, quantization and checksum from its manifest. */
    constructor(manifest: BundleManifest, facts: DeviceFacts, settings: ReportSettings) :
        this(manifest.family, manifest.format, manifest.quantization, manifest.manifestSha256, facts, settings)

    fun addRun(run: ReportRun) {
        runs.add(run)
    }

    val runCount: Int get() = runs.size

    fun toJsonValue(): JsonObject {
        check(runs.isNotEmpty()) { "a device report needs at least one run" }
        check(facts.device.isNotEmpty()) { "a device report needs the device name" }
        check(family.isNotEmpty() && platform.isNotEmpty()) { "a device report needs the family and platform" }

        fun obj(vararg kv: Pair<String, JsonValue>) = JsonObject(linkedMapOf(*kv))
        val runValues =
            runs.map { r ->
                val fields =
                    linkedMapOf<String, JsonValue>(
                        "ttft_ms" to JsonNumber.of(r.ttftMs),
                        "decode_tok_s" to JsonNumber.of(r.decodeTokS),
                    )
                for ((name, v) in r.optionalMetrics()) if (v != null) fields[name] = JsonNumber.of(v)
                fields["decode_tokens"] = JsonNumber.of(r.decodeTokens)
                JsonObject(fields)
            }
        return obj(
            "schema_version" to JsonNumber.of(SCHEMA_VERSION),
            "family" to JsonString(family),
            "device" to JsonString(facts.device),
            "platform" to JsonString(platform),
            "os_version" to JsonString(facts.osVersion),
            "app_version" to JsonString(facts.appVersion),
            "bundle" to
                obj(
                    "format" to JsonString(format),
                    "quantization" to JsonString(quantization),
                    "manifest_sha256" to JsonString(manifestSha256),
                ),
            "settings" to
                obj(
                    "image" to JsonString(settings.image),
                    "width" to JsonNumber.of(settings.width),
                    "height" to JsonNumber.of(settings.height),
                    "downsample_mode" to JsonString(settings.downsampleMode),
                    "max_slice_nums" to JsonNumber.of(settings.maxSliceNums),
                    "decode_tokens" to JsonNumber.of(settings.decodeTokens),
                ),
            "runs" to JsonArray(runValues),
        )
    }

    /** The report as indented JSON text with a final newline (write it as UTF-8). */
    fun toJson(): String = Json.writePretty(toJsonValue()) + "\n"

    companion object {
        const val SCHEMA_VERSION = 1
        const val PLATFORM = "android"
        const val FORMAT = "executorch"
    }
}
