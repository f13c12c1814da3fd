package org.minicpmvedge.core

import java.io.File
import java.nio.ByteBuffer
import java.nio.ByteOrder

/** A conformance kit (docs/conformance.md) read from the directory in env CONFORMANCE_KIT. */
class Kit(
    val dir: File,
) {
    val index: JsonObject = Json.parse(File(dir, "conformance.json").readBytes()).obj("conformance.json")

    init {
        require(index.req("schema").str() == "minicpmv-edge-conformance") { "$dir is not a conformance kit" }
        require(index.req("schema_version").int() == 1) { "kit schema_version is not 1" }
    }

    val sliceConfigJson: JsonValue get() = index.req("slice_config")
    val numPatchesPerSide: Int get() =
        index
            .req("model")
            .obj()
            .req("num_patches_per_side")
            .int()
    val imageTokenId: Int get() =
        index
            .req("model")
            .obj()
            .req("image_token_id")
            .int()

    fun list(key: String): List<JsonObject> =
        index
            .req(key)
            .arr(key)
            .items
            .map { it.obj(key) }

    fun asset(name: String): File =
        File(
            dir,
            index
                .req("assets")
                .obj()
                .req(name)
                .str(name),
        )

    fun hasAsset(name: String): Boolean = index.req("assets").obj().has(name)

    /** An array reference: file, dtype, shape, atol. */
    class ArrayRef(
        val file: File,
        val dtype: String,
        val shape: IntArray,
        val atol: Double,
    ) {
        val count: Int get() = shape.fold(1) { a, b -> a * b }

        private fun bytes(itemSize: Int): ByteBuffer {
            val b = file.readBytes()
            check(b.size.toLong() == count.toLong() * itemSize) {
                "${file.path}: ${b.size} bytes for $dtype ${shape.toList()} (need ${count.toLong() * itemSize})"
            }
            return ByteBuffer.wrap(b).order(ByteOrder.LITTLE_ENDIAN)
        }

        fun u8(): ByteArray {
            check(dtype == "uint8") { "${file.path} is $dtype, not uint8" }
            return bytes(1).array()
        }

        fun f32(): FloatArray {
            check(dtype == "float32") { "${file.path} is $dtype, not float32" }
            val out = FloatArray(count)
            bytes(4).asFloatBuffer().get(out)
            return out
        }

        fun i64(): LongArray {
            check(dtype == "int64") { "${file.path} is $dtype, not int64" }
            val out = LongArray(count)
            bytes(8).asLongBuffer().get(out)
            return out
        }
    }

    fun ref(value: JsonValue): ArrayRef {
        val o = value.obj("array reference")
        return ArrayRef(File(dir, o.req("file").str()), o.req("dtype").str(), o.req("shape").ints(), o.req("atol").double())
    }

    /** An image case's decoded input pixels. */
    fun pixels(case: JsonObject): ImagePixels {
        val ref = ref(case.req("pixels"))
        check(ref.shape.size == 3 && ref.shape[2] == 3) { "pixels must be [H, W, 3]" }
        return ImagePixels(ref.shape[1], ref.shape[0], ref.u8())
    }

    /** The config an image case was sliced with (the kit's slice_config with its overrides). */
    fun sliceConfig(case: JsonObject): SliceConfig =
        SliceConfig
            .fromJson(sliceConfigJson, numPatchesPerSide)
            .withOverrides(case.req("downsample_mode").str(), case.req("max_slice_nums").int())

    companion object {
        fun fromEnv(): Kit {
            val path = System.getenv("CONFORMANCE_KIT")
            require(!path.isNullOrEmpty()) { "set CONFORMANCE_KIT to a conformance kit directory (minicpmv-edge conformance --out DIR)" }
            return Kit(File(path))
        }
    }
}

/** The byte-level BPE vocabulary of tokenizer.json, enough to decode ids back into text (special tokens kept). */
class VocabDecoder(
    tokenizerJson: File,
) {
    private val pieces = HashMap<Int, ByteArray>()

    init {
        val root = Json.parse(tokenizerJson.readBytes()).obj("tokenizer.json")
        val byteOf = HashMap<Int, Int>() // GPT-2 bytes_to_unicode, inverted
        val printable = (33..126) + (161..172) + (174..255)
        var extra = 0
        for (b in 0 until 256) {
            if (b in printable) {
                byteOf[b] = b
            } else {
                byteOf[256 + extra] = b
                extra++
            }
        }
        for (t in root.opt("added_tokens")?.arr()?.items ?: emptyList()) {
            val o = t.obj()
            pieces[o.req("id").int()] = o.req("content").str().toByteArray(Charsets.UTF_8)
        }
        val vocab =
            root
                .req("model")
                .obj()
                .req("vocab")
                .obj("model.vocab")
        for ((token, idValue) in vocab.fields) {
            val id = idValue.int()
            if (pieces.containsKey(id)) continue // an added token: its content is literal
            val cps = token.codePoints().toArray()
            pieces[id] = ByteArray(cps.size) { i -> (byteOf[cps[i]] ?: error("token $token is not byte-level")).toByte() }
        }
    }

    fun decode(ids: IntArray): String {
        val out = java.io.ByteArrayOutputStream()
        for (id in ids) out.write(pieces[id] ?: error("id $id is not in the vocabulary"))
        return Json.utf8Strict(out.toByteArray())
    }
}
