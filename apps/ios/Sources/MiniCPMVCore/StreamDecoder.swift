/// Streaming detokenization, a port of edge_runtime/processing/tokenizer.py's StreamDecoder: push
/// ids one at a time, get back only complete UTF-8 text. Byte-level tokens map back to bytes through
/// the inverse of GPT-2's bytes_to_unicode; bytes that end mid-character are held until the character
/// completes; flush() turns a held incomplete tail into U+FFFD. Invalid bytes are replaced exactly
/// like Python's UTF-8 codec with errors="replace" (one U+FFFD per maximal ill-formed subpart).

enum ByteLevel {
    /// byte -> the character standing for it (GPT-2's bytes_to_unicode): printable bytes stand for
    /// themselves, the other 68 for U+0100.. in byte order.
    static let byteToScalar: [Unicode.Scalar] = {
        var table = [Unicode.Scalar](repeating: "\0", count: 256)
        var extra: UInt32 = 0
        for b in 0..<256 {
            let printable = (0x21...0x7E).contains(b) || (0xA1...0xAC).contains(b) || (0xAE...0xFF).contains(b)
            if printable {
                table[b] = Unicode.Scalar(UInt32(b))!
            } else {
                table[b] = Unicode.Scalar(256 + extra)!
                extra += 1
            }
        }
        return table
    }()

    /// character -> byte, the inverse.
    static let scalarToByte: [UInt32: UInt8] = {
        var map = [UInt32: UInt8]()
        for (b, s) in byteToScalar.enumerated() {
            map[s.value] = UInt8(b)
        }
        return map
    }()

    /// The bytes a byte-level token string stands for, or nil when a character is not a byte stand-in.
    static func bytes(of token: String) -> [UInt8]? {
        var out = [UInt8]()
        out.reserveCapacity(token.unicodeScalars.count)
        for s in token.unicodeScalars {
            guard let b = scalarToByte[s.value] else { return nil }
            out.append(b)
        }
        return out
    }
}

/// Incremental UTF-8 decoder with Python's errors="replace" semantics (codecs' incremental decoder).
public struct Utf8StreamDecoder: Sendable {
    private var pending: [UInt8] = []
    private var need = 0
    private var codePoint: UInt32 = 0

    public init() {}

    /// Decodes a chunk; returns the complete characters it finishes.
    public mutating func decode(_ bytes: [UInt8]) -> String {
        var out = String.UnicodeScalarView()
        for b in bytes {
            feed(b, &out)
        }
        return String(out)
    }

    /// Ends the stream: a held incomplete sequence becomes U+FFFD. Resets the decoder.
    public mutating func flush() -> String {
        if pending.isEmpty {
            return ""
        }
        reset()
        return "\u{FFFD}"
    }

    public mutating func reset() {
        pending = []
        need = 0
        codePoint = 0
    }

    private mutating func feed(_ b: UInt8, _ out: inout String.UnicodeScalarView) {
        if !pending.isEmpty {
            if continues(b) {
                pending.append(b)
                codePoint = (codePoint << 6) | UInt32(b & 0x3F)
                if pending.count == need {
                    out.append(Unicode.Scalar(codePoint)!)
                    reset()
                }
                return
            }
            out.append("\u{FFFD}")  // the held prefix is a maximal ill-formed subpart; b starts over
            reset()
        }
        switch b {
        case 0x00..<0x80: out.append(Unicode.Scalar(b))
        case 0xC2...0xDF: start(b, 2, UInt32(b & 0x1F))
        case 0xE0...0xEF: start(b, 3, UInt32(b & 0x0F))
        case 0xF0...0xF4: start(b, 4, UInt32(b & 0x07))
        default: out.append("\u{FFFD}")  // a stray continuation byte, C0, C1 or F5..FF
        }
    }

    private mutating func start(_ lead: UInt8, _ need: Int, _ bits: UInt32) {
        pending = [lead]
        self.need = need
        codePoint = bits
    }

    /// Whether b may follow the held bytes (no overlong forms, no surrogates, nothing above U+10FFFF).
    private func continues(_ b: UInt8) -> Bool {
        var lo: UInt8 = 0x80
        var hi: UInt8 = 0xBF
        if pending.count == 1 {
            switch pending[0] {
            case 0xE0: lo = 0xA0
            case 0xED: hi = 0x9F
            case 0xF0: lo = 0x90
            case 0xF4: hi = 0x8F
            default: break
            }
        }
        return b >= lo && b <= hi
    }

    /// Whole-buffer decoding with errors="replace".
    public static func decodeReplacing(_ bytes: [UInt8]) -> String {
        var d = Utf8StreamDecoder()
        return d.decode(bytes) + d.flush()
    }
}

/// Incremental detokenizer: `pieces.joined() + flush()` equals `tokenizer.decode(allIds)`.
public struct StreamDecoder {
    private let tokenizer: Tokenizer
    private let skipSpecial: Bool
    private var utf8 = Utf8StreamDecoder()

    public init(tokenizer: Tokenizer, skipSpecialTokens: Bool = true) {
        self.tokenizer = tokenizer
        self.skipSpecial = skipSpecialTokens
    }

    /// The text that id completes ("" while a character is incomplete, or for a skipped special token).
    public mutating func push(_ id: Int) -> String {
        if skipSpecial && tokenizer.isSpecial(id) {
            return ""
        }
        return utf8.decode(tokenizer.tokenBytes(id))
    }

    /// Whatever is held back (incomplete bytes become U+FFFD); resets the decoder.
    public mutating func flush() -> String {
        utf8.flush()
    }
}
