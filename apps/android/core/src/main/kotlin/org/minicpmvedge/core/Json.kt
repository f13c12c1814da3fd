package org.minicpmvedge.core

/**
 * A small JSON reader and writer (RFC 8259) for the bundle's host files (manifest.json,
 * preprocessor_config.json, tokenizer_config.json) and the device report. Numbers keep their
 * source text, so a manifest can be re-serialised canonically for its checksum without
 * reformatting floats; objects keep their key order.
 */
sealed interface JsonValue {
    val isNull: Boolean get() = this is JsonNull
}

data object JsonNull : JsonValue

data class JsonBool(
    val value: Boolean,
) : JsonValue

/** A number with its source text (`raw`); `toDouble()` and `toLongExact()` read it. */
data class JsonNumber(
    val raw: String,
) : JsonValue {
    fun toDouble(): Double = raw.toDouble()

    /** The value as a Long when it is an integer (no fraction or exponent), else an error. */
    fun toLongExact(): Long = raw.toLongOrNull() ?: throw JsonException("expected an integer, got $raw")

    fun toIntExact(): Int {
        val v = toLongExact()
        if (v < Int.MIN_VALUE || v > Int.MAX_VALUE) throw JsonException("integer $raw out of range")
        return v.toInt()
    }

    companion object {
        fun of(value: Long): JsonNumber = JsonNumber(value.toString())

        fun of(value: Int): JsonNumber = JsonNumber(value.toString())

        /** A finite double in a form any JSON reader parses back to the same value. */
        fun of(value: Double): JsonNumber {
            require(value.isFinite()) { "JSON numbers must be finite, got $value" }
            return JsonNumber(value.toString())
        }
    }
}

data class JsonString(
    val value: String,
) : JsonValue

data class JsonArray(
    val items: List<JsonValue>,
) : JsonValue {
    operator fun get(index: Int): JsonValue = items[index]

    val size: Int get() = items.size
}

data class JsonObject(
    val fields: Map<String, JsonValue>,
) : JsonValue {
    operator fun get(key: String): JsonValue? = fields[key]

    fun has(key: String): Boolean = fields.containsKey(key)
}

class JsonException(
    message: String,
) : RuntimeException(message)

// ---- typed access with one clear message per mistake --------------------------------------------

fun JsonValue.obj(what: String = "value"): JsonObject = this as? JsonObject ?: throw JsonException("$what must be an object")

fun JsonValue.arr(what: String = "value"): JsonArray = this as? JsonArray ?: throw JsonException("$what must be an array")

fun JsonValue.str(what: String = "value"): String = (this as? JsonString)?.value ?: throw JsonException("$what must be a string")

fun JsonValue.num(what: String = "value"): JsonNumber = this as? JsonNumber ?: throw JsonException("$what must be a number")

fun JsonValue.bool(what: String = "value"): Boolean = (this as? JsonBool)?.value ?: throw JsonException("$what must be true or false")

fun JsonValue.int(what: String = "value"): Int = num(what).toIntExact()

fun JsonValue.long(what: String = "value"): Long = num(what).toLongExact()

fun JsonValue.double(what: String = "value"): Double = num(what).toDouble()

fun JsonValue.ints(what: String = "value"): IntArray = arr(what).items.map { it.int("$what[]") }.toIntArray()

fun JsonValue.doubles(what: String = "value"): DoubleArray = arr(what).items.map { it.double("$what[]") }.toDoubleArray()

/** The field, or null when it is absent or JSON null. */
fun JsonObject.opt(key: String): JsonValue? = fields[key]?.takeUnless { it.isNull }

fun JsonObject.req(key: String): JsonValue = opt(key) ?: throw JsonException("missing field \"$key\"")

object Json {
    /** Parses one JSON document (surrounding whitespace allowed, nothing else after it). */
    fun parse(text: String): JsonValue = Parser(text).document()

    fun parse(bytes: ByteArray): JsonValue = parse(utf8Strict(bytes))

    /** Compact text (`,` and `:` separators, keys in the given order, non-ASCII written as is). */
    fun write(value: JsonValue): String = StringBuilder().also { writeTo(it, value, null, 0, false) }.toString()

    /** Indented text (two spaces), as `json.dumps(indent=2)` lays it out. */
    fun writePretty(value: JsonValue): String = StringBuilder().also { writeTo(it, value, "  ", 0, false) }.toString()

    /**
     * Python's `json.dumps(v, sort_keys=True, separators=(",", ":"), ensure_ascii=False)` of a
     * document whose numbers Python wrote (their source text is Python's repr, kept as read).
     */
    fun canonical(value: JsonValue): String = StringBuilder().also { writeTo(it, value, null, 0, true) }.toString()

    fun quote(s: String): String = StringBuilder().also { writeString(it, s) }.toString()

    private fun writeTo(
        out: StringBuilder,
        value: JsonValue,
        indent: String?,
        depth: Int,
        sortKeys: Boolean,
    ) {
        when (value) {
            JsonNull -> {
                out.append("null")
            }

            is JsonBool -> {
                out.append(if (value.value) "true" else "false")
            }

            is JsonNumber -> {
                out.append(value.raw)
            }

            is JsonString -> {
                writeString(out, value.value)
            }

            is JsonArray -> {
                if (value.items.isEmpty()) {
                    out.append("[]")
                    return
                }
                out.append('[')
                value.items.forEachIndexed { i, item ->
                    if (i > 0) out.append(',')
                    newline(out, indent, depth + 1)
                    writeTo(out, item, indent, depth + 1, sortKeys)
                }
                newline(out, indent, depth)
                out.append(']')
            }

            is JsonObject -> {
                if (value.fields.isEmpty()) {
                    out.append("{}")
                    return
                }
                out.append('{')
                val keys = if (sortKeys) value.fields.keys.sortedWith(::compareCodePoints) else value.fields.keys.toList()
                keys.forEachIndexed { i, key ->
                    if (i > 0) out.append(',')
                    newline(out, indent, depth + 1)
                    writeString(out, key)
                    out.append(if (indent == null) ":" else ": ")
                    writeTo(out, value.fields.getValue(key), indent, depth + 1, sortKeys)
                }
                newline(out, indent, depth)
                out.append('}')
            }
        }
    }

    private fun newline(
        out: StringBuilder,
        indent: String?,
        depth: Int,
    ) {
        if (indent == null) return
        out.append('\n')
        repeat(depth) { out.append(indent) }
    }

    /** Python sorts str keys by code point; UTF-16 order differs only around surrogates. */
    private fun compareCodePoints(
        a: String,
        b: String,
    ): Int {
        var i = 0
        var j = 0
        while (i < a.length && j < b.length) {
            val ca = a.codePointAt(i)
            val cb = b.codePointAt(j)
            if (ca != cb) return ca.compareTo(cb)
            i += Character.charCount(ca)
            j += Character.charCount(cb)
        }
        return (a.length - i).compareTo(b.length - j)
    }

    /** Escapes as Python's json with ensure_ascii=False: `"`, `\`, and control characters below 0x20. */
    private fun writeString(
        out: StringBuilder,
        s: String,
    ) {
        out.append('"')
        for (ch in s) {
            when (ch) {
                '"' -> {
                    out.append("\\\"")
                }

                '\\' -> {
                    out.append("\\\\")
                }

                '\n' -> {
                    out.append("\\n")
                }

                '\r' -> {
                    out.append("\\r")
                }

                '\t' -> {
                    out.append("\\t")
                }

                '\b' -> {
                    out.append("\\b")
                }

                '\u000c' -> {
                    out.append("\\f")
                }

                else -> {
                    if (ch < ' ') {
                        out.append("\\u").append(String.format("%04x", ch.code))
                    } else {
                        out.append(ch)
                    }
                }
            }
        }
        out.append('"')
    }

    /** UTF-8 to String, refusing malformed bytes (a JSON file must be valid UTF-8). */
    fun utf8Strict(bytes: ByteArray): String {
        val decoder =
            Charsets.UTF_8
                .newDecoder()
                .onMalformedInput(java.nio.charset.CodingErrorAction.REPORT)
                .onUnmappableCharacter(java.nio.charset.CodingErrorAction.REPORT)
        return try {
            decoder.decode(java.nio.ByteBuffer.wrap(bytes)).toString()
        } catch (e: java.nio.charset.CharacterCodingException) {
            throw JsonException("not valid UTF-8: ${e.message}")
        }
    }

    private class Parser(
        private val s: String,
    ) {
        private var pos = 0

        fun document(): JsonValue {
            if (s.startsWith("\uFEFF")) pos = 1
            val v = value(0)
            skipWs()
            if (pos != s.length) fail("unexpected text after the document")
            return v
        }

        private fun fail(msg: String): Nothing = throw JsonException("JSON: $msg at offset $pos")

        private fun skipWs() {
            while (pos < s.length && (s[pos] == ' ' || s[pos] == '\t' || s[pos] == '\n' || s[pos] == '\r')) pos++
        }

        private fun value(depth: Int): JsonValue {
            if (depth > 512) fail("nested too deeply")
            skipWs()
            if (pos >= s.length) fail("unexpected end")
            return when (val c = s[pos]) {
                '{' -> obj(depth)
                '[' -> arr(depth)
                '"' -> JsonString(string())
                't' -> literal("true", JsonBool(true))
                'f' -> literal("false", JsonBool(false))
                'n' -> literal("null", JsonNull)
                else -> if (c == '-' || c in '0'..'9') number() else fail("unexpected character '$c'")
            }
        }

        private fun literal(
            word: String,
            v: JsonValue,
        ): JsonValue {
            if (!s.startsWith(word, pos)) fail("expected $word")
            pos += word.length
            return v
        }

        private fun obj(depth: Int): JsonObject {
            pos++
            val fields = LinkedHashMap<String, JsonValue>()
            skipWs()
            if (pos < s.length && s[pos] == '}') {
                pos++
                return JsonObject(fields)
            }
            while (true) {
                skipWs()
                if (pos >= s.length || s[pos] != '"') fail("expected a key")
                val key = string()
                skipWs()
                if (pos >= s.length || s[pos] != ':') fail("expected ':'")
                pos++
                if (fields.containsKey(key)) fail("duplicate key \"$key\"")
                fields[key] = value(depth + 1)
                skipWs()
                if (pos >= s.length) fail("unexpected end in an object")
                when (s[pos++]) {
                    ',' -> {
                        continue
                    }

                    '}' -> {
                        return JsonObject(fields)
                    }

                    else -> {
                        pos--
                        fail("expected ',' or '}'")
                    }
                }
            }
        }

        private fun arr(depth: Int): JsonArray {
            pos++
            val items = ArrayList<JsonValue>()
            skipWs()
            if (pos < s.length && s[pos] == ']') {
                pos++
                return JsonArray(items)
            }
            while (true) {
                items.add(value(depth + 1))
                skipWs()
                if (pos >= s.length) fail("unexpected end in an array")
                when (s[pos++]) {
                    ',' -> {
                        continue
                    }

                    ']' -> {
                        return JsonArray(items)
                    }

                    else -> {
                        pos--
                        fail("expected ',' or ']'")
                    }
                }
            }
        }

        private fun string(): String {
            pos++ // opening quote
            val out = StringBuilder()
            while (true) {
                if (pos >= s.length) fail("unterminated string")
                val c = s[pos++]
                when {
                    c == '"' -> {
                        return out.toString()
                    }

                    c == '\\' -> {
                        if (pos >= s.length) fail("unterminated escape")
                        when (val e = s[pos++]) {
                            '"' -> {
                                out.append('"')
                            }

                            '\\' -> {
                                out.append('\\')
                            }

                            '/' -> {
                                out.append('/')
                            }

                            'b' -> {
                                out.append('\b')
                            }

                            'f' -> {
                                out.append('\u000c')
                            }

                            'n' -> {
                                out.append('\n')
                            }

                            'r' -> {
                                out.append('\r')
                            }

                            't' -> {
                                out.append('\t')
                            }

                            'u' -> {
                                if (pos + 4 > s.length) fail("short \\u escape")
                                val hex = s.substring(pos, pos + 4)
                                if (!hex.all { it in '0'..'9' || it in 'a'..'f' || it in 'A'..'F' }) fail("bad \\u escape")
                                out.append(hex.toInt(16).toChar())
                                pos += 4
                            }

                            else -> {
                                fail("bad escape '\\$e'")
                            }
                        }
                    }

                    c < ' ' -> {
                        fail("control character in a string")
                    }

                    else -> {
                        out.append(c)
                    }
                }
            }
        }

        private fun number(): JsonNumber {
            val start = pos
            if (s[pos] == '-') pos++
            if (pos >= s.length) fail("bad number")
            if (s[pos] == '0') {
                pos++
            } else if (s[pos] in '1'..'9') {
                while (pos < s.length && s[pos] in '0'..'9') pos++
            } else {
                fail("bad number")
            }
            if (pos < s.length && s[pos] == '.') {
                pos++
                if (pos >= s.length || s[pos] !in '0'..'9') fail("bad number")
                while (pos < s.length && s[pos] in '0'..'9') pos++
            }
            if (pos < s.length && (s[pos] == 'e' || s[pos] == 'E')) {
                pos++
                if (pos < s.length && (s[pos] == '+' || s[pos] == '-')) pos++
                if (pos >= s.length || s[pos] !in '0'..'9') fail("bad number")
                while (pos < s.length && s[pos] in '0'..'9') pos++
            }
            return JsonNumber(s.substring(start, pos))
        }
    }
}
