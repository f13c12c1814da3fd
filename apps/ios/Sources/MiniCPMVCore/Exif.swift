/// EXIF orientation of JPEG files, applied like PIL's `ImageOps.exif_transpose` (what the
/// reference's `load_image` does), so phone photos come out upright before slicing. On iOS the app
/// reads the orientation from ImageIO as well; this parser is what the kit checks and what the
/// app falls back on for JPEG bytes.
public enum Exif {
    static let tagOrientation = 0x0112
    static let typeShort = 3

    private struct ByteView {
        let bytes: ArraySlice<UInt8>
        let little: Bool

        func has(_ offset: Int, _ length: Int) -> Bool {
            offset >= 0 && offset + length <= bytes.count
        }

        func u16(_ offset: Int) -> Int {
            let a = Int(bytes[bytes.startIndex + offset])
            let b = Int(bytes[bytes.startIndex + offset + 1])
            return little ? (a | (b << 8)) : ((a << 8) | b)
        }

        func u32(_ offset: Int) -> Int {
            let lo = little ? u16(offset) : u16(offset + 2)
            let hi = little ? u16(offset + 2) : u16(offset)
            return hi * 65536 + lo
        }
    }

    /// Orientation from a TIFF structure (an EXIF payload after "Exif\0\0"); 0 when absent or malformed.
    public static func tiffOrientation(_ tiff: ArraySlice<UInt8>) -> Int {
        guard tiff.count >= 8 else { return 0 }
        let b0 = tiff[tiff.startIndex]
        let b1 = tiff[tiff.startIndex + 1]
        let little: Bool
        if b0 == 0x49 && b1 == 0x49 {
            little = true  // "II"
        } else if b0 == 0x4D && b1 == 0x4D {
            little = false  // "MM"
        } else {
            return 0
        }
        let view = ByteView(bytes: tiff, little: little)
        guard view.u16(2) == 42 else { return 0 }
        let ifd = view.u32(4)
        guard view.has(ifd, 2) else { return 0 }
        let count = view.u16(ifd)
        for i in 0..<count {
            let entry = ifd + 2 + i * 12
            guard view.has(entry, 12) else { return 0 }
            if view.u16(entry) == tagOrientation {
                if view.u16(entry + 2) != typeShort || view.u32(entry + 4) < 1 {
                    return 0
                }
                return view.u16(entry + 8)  // a SHORT sits in the first 2 bytes of the value field
            }
        }
        return 0
    }

    /// The EXIF Orientation (1-8) of a JPEG file (APP1 "Exif" segment, IFD0 tag 0x0112, either byte
    /// order), or 0 when there is no usable one (not a JPEG, no EXIF or no tag, a malformed segment,
    /// a value outside 1-8: PIL leaves such images as they are).
    public static func jpegOrientation(_ bytes: [UInt8]) -> Int {
        guard bytes.count >= 4, bytes[0] == 0xFF, bytes[1] == 0xD8 else { return 0 }
        var pos = 2
        while pos + 4 <= bytes.count {
            guard bytes[pos] == 0xFF else { return 0 }
            var marker = bytes[pos + 1]
            while marker == 0xFF && pos + 2 < bytes.count {  // fill bytes
                pos += 1
                marker = bytes[pos + 1]
            }
            pos += 2
            if marker == 0xD9 || marker == 0xDA {  // EOI, start of scan: no metadata after this
                return 0
            }
            if marker == 0x01 || (0xD0...0xD7).contains(marker) {  // no length field
                continue
            }
            guard pos + 2 <= bytes.count else { return 0 }
            let length = (Int(bytes[pos]) << 8) | Int(bytes[pos + 1])
            guard length >= 2, pos + length <= bytes.count else { return 0 }
            let body = pos + 2
            if marker == 0xE1 && length >= 2 + 6 + 8
                && Array(bytes[body..<(body + 6)]) == [0x45, 0x78, 0x69, 0x66, 0, 0]
            {
                let o = tiffOrientation(bytes[(body + 6)..<(pos + length)])
                return (1...8).contains(o) ? o : 0
            }
            pos += length
        }
        return 0
    }

    /// The upright image for EXIF `orientation` (2 mirror, 3 rotate 180, 4 flip, 5 transpose,
    /// 6 rotate 90 clockwise, 7 transverse, 8 rotate 90 counter-clockwise); other values return the
    /// image unchanged.
    public static func applyOrientation(_ img: ImagePixels, _ orientation: Int) -> ImagePixels {
        guard (2...8).contains(orientation) else { return img }
        let w = img.width
        let h = img.height
        let swap = orientation >= 5
        let outW = swap ? h : w
        let outH = swap ? w : h
        // For output pixel (x, y), the input pixel is (ax + bx*x + cx*y, ay + by*x + cy*y).
        var (ax, bx, cx, ay, by, cy) = (0, 0, 0, 0, 0, 0)
        switch orientation {
        case 2: (ax, bx, cy) = (w - 1, -1, 1)  // mirror left-right
        case 3: (ax, bx, ay, cy) = (w - 1, -1, h - 1, -1)  // rotate 180
        case 4: (bx, ay, cy) = (1, h - 1, -1)  // flip top-bottom
        case 5: (cx, by) = (1, 1)  // transpose
        case 6: (cx, ay, by) = (1, h - 1, -1)  // rotate 90 clockwise
        case 7: (ax, cx, ay, by) = (w - 1, -1, h - 1, -1)  // transverse
        default: (ax, cx, by) = (w - 1, -1, 1)  // 8: rotate 90 counter-clockwise
        }
        var out = [UInt8](repeating: 0, count: img.rgb.count)
        var o = 0
        for y in 0..<outH {
            for x in 0..<outW {
                let sx = ax + bx * x + cx * y
                let sy = ay + by * x + cy * y
                let s = (sy * w + sx) * 3
                out[o] = img.rgb[s]
                out[o + 1] = img.rgb[s + 1]
                out[o + 2] = img.rgb[s + 2]
                o += 3
            }
        }
        return try! ImagePixels(width: outW, height: outH, rgb: out)  // swiftlint:disable:this force_try
    }

    /// [height, width] from a JPEG's SOFn segment, or nil when there is none before the scan.
    public static func jpegSize(_ bytes: [UInt8]) -> [Int]? {
        guard bytes.count >= 4, bytes[0] == 0xFF, bytes[1] == 0xD8 else { return nil }
        var pos = 2
        while pos + 4 <= bytes.count {
            guard bytes[pos] == 0xFF else { return nil }
            let marker = bytes[pos + 1]
            pos += 2
            if marker == 0xD9 || marker == 0xDA { return nil }
            if marker == 0x01 || (0xD0...0xD7).contains(marker) { continue }
            let length = (Int(bytes[pos]) << 8) | Int(bytes[pos + 1])
            let isSOF = (0xC0...0xCF).contains(marker) && ![0xC4, 0xC8, 0xCC].contains(marker)
            if isSOF && pos + 7 <= bytes.count {
                let height = (Int(bytes[pos + 3]) << 8) | Int(bytes[pos + 4])
                let width = (Int(bytes[pos + 5]) << 8) | Int(bytes[pos + 6])
                return [height, width]
            }
            pos += length
        }
        return nil
    }
}
