package org.minicpmvedge.core

/**
 * EXIF orientation of JPEG files, applied like PIL's `ImageOps.exif_transpose` (what the
 * reference's `load_image` does), so phone photos come out upright before slicing.
 */
object Exif {
    private const val TAG_ORIENTATION = 0x0112
    private const val TYPE_SHORT = 3

    private class View(
        private val b: ByteArray,
        private val from: Int,
        private val to: Int,
        private val little: Boolean,
    ) {
        fun has(
            offset: Long,
            length: Int,
        ): Boolean = offset >= 0 && from + offset + length <= to

        private fun u8(offset: Int): Int = b[from + offset].toInt() and 0xff

        fun u16(offset: Int): Int = if (little) u8(offset) or (u8(offset + 1) shl 8) else (u8(offset) shl 8) or u8(offset + 1)

        fun u32(offset: Int): Long {
            val lo = if (little) u16(offset) else u16(offset + 2)
            val hi = if (little) u16(offset + 2) else u16(offset)
            return hi.toLong() * 65536 + lo
        }
    }

    /** Orientation from a TIFF structure (an EXIF payload after "Exif\0\0") in bytes[from, to); 0 when absent or malformed. */
    fun tiffOrientation(
        bytes: ByteArray,
        from: Int = 0,
        to: Int = bytes.size,
    ): Int {
        if (to - from < 8) return 0
        val b0 = bytes[from].toInt() and 0xff
        val b1 = bytes[from + 1].toInt() and 0xff
        val little =
            when {
                b0 == 0x49 && b1 == 0x49 -> true

                // "II"
                b0 == 0x4d && b1 == 0x4d -> false

                // "MM"
                else -> return 0
            }
        val v = View(bytes, from, to, little)
        if (v.u16(2) != 42) return 0
        val ifd = v.u32(4)
        if (!v.has(ifd, 2)) return 0
        val at = ifd.toInt()
        val count = v.u16(at)
        for (i in 0 until count) {
            val entry = at + 2 + i * 12
            if (!v.has(entry.toLong(), 12)) return 0
            if (v.u16(entry) == TAG_ORIENTATION) {
                if (v.u16(entry + 2) != TYPE_SHORT || v.u32(entry + 4) < 1) return 0
                return v.u16(entry + 8) // a SHORT value sits in the first 2 bytes of the value field
            }
        }
        return 0
    }

    /**
     * The EXIF Orientation (1-8) of a JPEG file (APP1 "Exif" segment, IFD0 tag 0x0112, either byte
     * order), or 0 when the bytes carry none: not a JPEG, no EXIF or no Orientation tag, a
     * malformed segment, or a value outside 1-8 (PIL leaves such images as they are). A caller
     * may then ask the platform (ExifInterface for HEIC, WebP) and treat 0 as 1.
     */
    fun jpegOrientation(bytes: ByteArray): Int {
        fun u8(i: Int) = bytes[i].toInt() and 0xff
        if (bytes.size < 4 || u8(0) != 0xff || u8(1) != 0xd8) return 0
        var pos = 2
        while (pos + 4 <= bytes.size) {
            if (u8(pos) != 0xff) return 0
            var marker = u8(pos + 1)
            while (marker == 0xff && pos + 2 < bytes.size) { // fill bytes
                pos++
                marker = u8(pos + 1)
            }
            pos += 2
            if (marker == 0xd9 || marker == 0xda) return 0 // EOI, start of scan: no metadata after this
            if (marker == 0x01 || marker in 0xd0..0xd7) continue // no length field
            if (pos + 2 > bytes.size) return 0
            val length = (u8(pos) shl 8) or u8(pos + 1)
            if (length < 2 || pos + length > bytes.size) return 0
            val body = pos + 2
            if (marker == 0xe1 && length >= 2 + 6 + 8 &&
                u8(body) == 0x45 && u8(body + 1) == 0x78 && u8(body + 2) == 0x69 && u8(body + 3) == 0x66 &&
                u8(body + 4) == 0 && u8(body + 5) == 0
            ) {
                val o = tiffOrientation(bytes, body + 6, pos + length)
                return if (o in 1..8) o else 0
            }
            pos += length
        }
        return 0
    }

    /**
     * The upright image for EXIF [orientation] (PIL exif_transpose: 2 mirror, 3 rotate 180, 4 flip,
     * 5 transpose, 6 rotate 90 clockwise, 7 transverse, 8 rotate 90 counter-clockwise); other
     * values return the image unchanged.
     */
    fun applyOrientation(
        img: ImagePixels,
        orientation: Int,
    ): ImagePixels {
        if (orientation !in 2..8) return img
        val w = img.width
        val h = img.height
        val swap = orientation >= 5
        val outW = if (swap) h else w
        val outH = if (swap) w else h
        // output (x, y) reads input (ax + bx*x + cx*y, ay + by*x + cy*y)
        var ax = 0
        var bx = 0
        var cx = 0
        var ay = 0
        var by = 0
        var cy = 0
        when (orientation) {
            2 -> {
                ax = w - 1
                bx = -1
                cy = 1
            }

            // mirror left-right
            3 -> {
                ax = w - 1
                bx = -1
                ay = h - 1
                cy = -1
            }

            // rotate 180
            4 -> {
                bx = 1
                ay = h - 1
                cy = -1
            }

            // flip top-bottom
            5 -> {
                cx = 1
                by = 1
            }

            // transpose
            6 -> {
                cx = 1
                ay = h - 1
                by = -1
            }

            // rotate 90 clockwise
            7 -> {
                ax = w - 1
                cx = -1
                ay = h - 1
                by = -1
            }

            // transverse
            else -> {
                ax = w - 1
                cx = -1
                by = 1
            } // 8: rotate 90 counter-clockwise
        }
        val src = img.rgb
        val out = ByteArray(src.size)
        var o = 0
        for (y in 0 until outH) {
            for (x in 0 until outW) {
                val s = ((ay + by * x + cy * y) * w + (ax + bx * x + cx * y)) * 3
                out[o] = src[s]
                out[o + 1] = src[s + 1]
                out[o + 2] = src[s + 2]
                o += 3
            }
        }
        return ImagePixels(outW, outH, out)
    }
}
