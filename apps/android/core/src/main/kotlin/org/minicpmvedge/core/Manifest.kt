package org.minicpmvedge.core

import java.security.MessageDigest

/**
 * The part of a bundle's manifest.json (docs/bundle.md) the Android app reads itself: what the
 * bundle is (family, format, quantization, its checksum for the device report), the host files
 * (chat template, tokenizer config), the preprocessing settings and the vision position table.
 * The graphs are the stock runner's business. A manifest that records `manifest_sha256` must
 * match it (sha256 of the canonical JSON without that field, as edge_runtime.schema computes it).
 */
class BundleManifest private constructor(
    val raw: JsonObject,
) {
    val schemaVersion: Int = raw.req("schema_version").int("schema_version")
    val family: String = raw.req("family").str("family")
    val target: String = raw.opt("target")?.str("target") ?: ""
    val format: String = raw.req("format").str("format")
    val quantization: String = raw.req("quantization").str("quantization")

    /** The manifest's own checksum ("" for a bundle written before manifests were signed). */
    val manifestSha256: String = raw.opt("manifest_sha256")?.str("manifest_sha256") ?: ""
    val numPatchesPerSide: Int =
        raw
            .req("model")
            .obj("model")
            .req("num_patches_per_side")
            .int("model.num_patches_per_side")
    val imageTokenId: Int =
        raw
            .req("model")
            .obj("model")
            .req("image_token_id")
            .int("model.image_token_id")

    /** File name of the chat template in the bundle (prompt.chat_template). */
    val chatTemplateFile: String =
        raw
            .req("prompt")
            .obj("prompt")
            .req("chat_template")
            .str("prompt.chat_template")
    val stopIds: IntArray =
        raw
            .req("prompt")
            .obj("prompt")
            .req("stop_ids")
            .ints("prompt.stop_ids")

    /**
     * How RoPE positions are computed (model.rope_positions): "cache" = the cache index, which is
     * what the stock runner feeds; absent in bundles written before it, which are all "cache".
     */
    val ropePositions: String =
        raw
            .req("model")
            .obj("model")
            .opt("rope_positions")
            ?.str("model.rope_positions") ?: "cache"

    /** Paths the bundle lists (relative to its directory). */
    val files: Set<String> =
        raw
            .req("files")
            .obj("files")
            .fields.keys

    /** The preprocessing settings (the checkpoint's preprocessor_config.json copy) with the position table side. */
    val sliceConfig: SliceConfig = SliceConfig.fromJson(raw.req("preprocessing"), numPatchesPerSide)

    init {
        if (schemaVersion != SCHEMA_VERSION) {
            throw BundleException("manifest schema_version $schemaVersion is not supported (this app reads $SCHEMA_VERSION)")
        }
        // Canvas M-RoPE (MiniCPM-V 4.7): the host computes three RoPE rows per token from the prompt's
        // image layout and feeds them to text_decoder's position_ids input. Neither this app nor the
        // stock runner computes them yet, so such a bundle is refused before any model loads rather
        // than answering with wrong positions.
        if (ropePositions != "cache") {
            throw BundleException(
                "$family positions RoPE by host-computed $ropePositions rows (model.rope_positions \"$ropePositions\"), " +
                    "which this app does not compute yet; run this bundle with minicpmv-edge chat --bundle",
            )
        }
    }

    companion object {
        const val SCHEMA_VERSION = 1

        /** Reads manifest.json bytes; throws [BundleException] on a malformed or tampered manifest. */
        fun parse(bytes: ByteArray): BundleManifest {
            val json =
                try {
                    Json.parse(bytes)
                } catch (e: JsonException) {
                    throw BundleException("manifest.json: ${e.message}")
                }
            val obj = json as? JsonObject ?: throw BundleException("manifest.json must be a JSON object")
            val recorded = obj.opt("manifest_sha256")
            if (recorded != null) {
                val actual = checksum(obj)
                if (recorded !is JsonString || recorded.value != actual) {
                    throw BundleException(
                        "manifest.json: manifest_sha256 mismatch (records ${Json.write(recorded).take(14)}..., content hashes to " +
                            "${actual.take(12)}...); the manifest was changed or corrupted",
                    )
                }
            }
            return try {
                BundleManifest(obj)
            } catch (e: JsonException) {
                throw BundleException("manifest.json: ${e.message}")
            } catch (e: IllegalArgumentException) {
                throw BundleException("manifest.json: ${e.message}")
            }
        }

        /** sha256 (hex) of the canonical JSON of the manifest without its manifest_sha256 field. */
        fun checksum(manifest: JsonObject): String {
            val body = JsonObject(manifest.fields.filterKeys { it != "manifest_sha256" })
            val digest = MessageDigest.getInstance("SHA-256").digest(Json.canonical(body).toByteArray(Charsets.UTF_8))
            return digest.joinToString("") { "%02x".format(it.toInt() and 0xff) }
        }
    }
}

class BundleException(
    message: String,
) : RuntimeException(message)
