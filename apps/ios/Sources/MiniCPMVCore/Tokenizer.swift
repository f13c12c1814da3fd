import Foundation

/// The checkpoint's tokenizer, our own byte-level BPE over tokenizer.json (swift-transformers'
/// `Tokenizers` cannot be fetched on the project's machines, and this is small): added tokens are
/// split out of the raw text first (leftmost-longest, as the `tokenizers` runtime does), each
/// remaining segment is normalised (NFC), pre-tokenised (the Split regex run through
/// NSRegularExpression, "Isolated" behaviour; ByteLevel), mapped to GPT-2's byte alphabet and merged
/// by rank. Symbols are kept as byte strings, never as Swift Strings (whose equality is canonical
/// equivalence). Encoding adds no BOS/EOS and recognises special tokens written in the text, as
/// transformers does. Decoding is byte-level with Python's errors="replace".
///
/// Supported tokenizer.json: model BPE (no dropout, no byte fallback), normalizer NFC / none /
/// a Sequence of those, pre_tokenizer Split(Regex, Isolated) / ByteLevel / a Sequence of those,
/// decoder ByteLevel. Anything else is refused with a message naming it.
public final class Tokenizer: @unchecked Sendable {
    /// The MiniCPM-V processor's named tokens (tokenizer_config `extra_special_tokens`) with the 4.6
    /// checkpoint's strings as defaults; a checkpoint may override any of them.
    public static let defaultExtraSpecialTokens: [(String, String)] = [
        ("image_token", "<|image_pad|>"), ("video_token", "<|video_pad|>"), ("image_start_token", "<image>"),
        ("image_end_token", "</image>"), ("slice_start_token", "<slice>"), ("slice_end_token", "</slice>"),
        ("image_id_start_token", "<image_id>"), ("image_id_end_token", "</image_id>"),
    ]
    static let imStart = "<|im_start|>"
    static let imEnd = "<|im_end|>"
    static let endOfText = "<|endoftext|>"
    /// GPT-2's pre-tokenizer regex (ByteLevel with use_regex true).
    static let gpt2Pattern = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"

    struct AddedToken {
        let id: Int
        let content: String
        let utf16: [UInt16]
        let special: Bool
        let lstrip: Bool
        let rstrip: Bool
    }

    enum PreStep {
        case split(NSRegularExpression)
        case byteLevel(NSRegularExpression?)
    }

    /// extra_special_tokens name -> token string.
    public let extraSpecialTokens: [String: String]
    /// generation_config's eos_token_id (int or list) when given, else the config's eos + ChatML enders.
    public private(set) var stopIds: [Int] = []
    /// Number of ids, added tokens included.
    public let vocabSize: Int

    private let tokenToIdMap: [String: Int]
    private let idBytes: [Int: [UInt8]]
    private let byteVocab: [[UInt8]: Int]
    private let singleByteIds: [Int]
    /// (left id, right id) -> (rank, merged id)
    private let merges: [Int64: (rank: Int, id: Int)]
    private let added: [AddedToken]
    private let specialIds: Set<Int>
    private let nfc: Bool
    private let steps: [PreStep]
    private var cache: [[UInt8]: [Int]] = [:]
    private let lock = NSLock()

    /// - Parameters: the texts of tokenizer.json, tokenizer_config.json (nil when absent) and
    ///   generation_config.json (nil when absent).
    public init(tokenizerJSON: String, tokenizerConfigJSON: String?, generationConfigJSON: String? = nil) throws {
        let tj = try JSONObject.parse(tokenizerJSON, "tokenizer.json")
        let model = try tj.object("model")
        let modelType = (try? model.string("type")) ?? "BPE"
        guard modelType == "BPE" else {
            throw CoreError.invalid("tokenizer.json: model type \(modelType) is not supported (BPE only)")
        }
        if model.has("dropout"), let d = try? model.double("dropout"), d > 0 {
            throw CoreError.invalid("tokenizer.json: BPE dropout is not supported")
        }
        if let fallback = model.raw["byte_fallback"] as? Bool, fallback {
            throw CoreError.invalid("tokenizer.json: byte_fallback BPE is not supported")
        }
        let decoder = try tj.optionalObject("decoder")
        guard let decoderType = try decoder?.string("type"), decoderType == "ByteLevel" else {
            throw CoreError.invalid("tokenizer.json: only byte-level tokenizers (decoder ByteLevel) are supported")
        }
        nfc = try Tokenizer.readNormalizer(tj.optionalObject("normalizer"))
        steps = try Tokenizer.readPreTokenizer(tj.optionalObject("pre_tokenizer"))

        // the vocabulary, as byte strings
        let vocabObject = try model.object("vocab")
        var tokenToId = [String: Int]()
        var idBytes = [Int: [UInt8]]()
        var byteVocab = [[UInt8]: Int]()
        for (token, value) in vocabObject.raw {
            let id = try JSONObject.toInt(value, "tokenizer.json model.vocab[\(token)]")
            tokenToId[token] = id
            guard let bytes = ByteLevel.bytes(of: token) else {
                throw CoreError.invalid("tokenizer.json: vocab token \(token) is not in the byte-level alphabet")
            }
            idBytes[id] = bytes
            byteVocab[bytes] = id
        }
        var singles = [Int](repeating: -1, count: 256)
        for b in 0..<256 {
            singles[b] = byteVocab[[UInt8(b)]] ?? -1
        }
        // merges: "a b" strings or [a, b] pairs
        var merges = [Int64: (rank: Int, id: Int)]()
        for (rank, entry) in try model.array("merges").enumerated() {
            let pair: [String]
            if let s = entry as? String {
                let parts = s.split(separator: " ", omittingEmptySubsequences: false)
                guard parts.count == 2 else {
                    throw CoreError.invalid("tokenizer.json: merge \(rank) is not two tokens: \(s)")
                }
                pair = parts.map(String.init)
            } else if let a = entry as? [String], a.count == 2 {
                pair = a
            } else {
                throw CoreError.invalid("tokenizer.json: merge \(rank) is neither \"a b\" nor [a, b]")
            }
            guard let left = ByteLevel.bytes(of: pair[0]).flatMap({ byteVocab[$0] }),
                let right = ByteLevel.bytes(of: pair[1]).flatMap({ byteVocab[$0] }),
                let merged = byteVocab[idBytes[left]! + idBytes[right]!]
            else {
                throw CoreError.invalid("tokenizer.json: merge \(rank) (\(pair[0]) \(pair[1])) is not in the vocab")
            }
            let key = Int64(left) << 32 | Int64(right)
            if merges[key] == nil {
                merges[key] = (rank, merged)
            }
        }
        // added tokens
        var added = [AddedToken]()
        var special = Set<Int>()
        for (i, t) in try tj.objects("added_tokens").enumerated() {
            let content = try t.string("content")
            let id = try t.int("id")
            guard !content.isEmpty else {
                throw CoreError.invalid("tokenizer.json added_tokens[\(i)] is empty")
            }
            let isSpecial = (try? t.bool("special")) ?? false
            if (try? t.bool("single_word")) == true {
                throw CoreError.invalid("tokenizer.json: single_word added tokens are not supported (\(content))")
            }
            added.append(
                AddedToken(
                    id: id, content: content, utf16: Array(content.utf16), special: isSpecial,
                    lstrip: (try? t.bool("lstrip")) ?? false, rstrip: (try? t.bool("rstrip")) ?? false))
            if isSpecial {
                special.insert(id)
            }
            tokenToId[content] = id
            idBytes[id] = Array(content.utf8)
        }
        self.tokenToIdMap = tokenToId
        self.idBytes = idBytes
        self.byteVocab = byteVocab
        self.singleByteIds = singles
        self.merges = merges
        self.added = added
        self.specialIds = special
        self.vocabSize = (idBytes.keys.max() ?? -1) + 1

        // tokenizer_config: named MiniCPM-V tokens
        let config = try tokenizerConfigJSON.map { try JSONObject.parse($0, "tokenizer_config.json") }
        let extra = try config?.optionalObject("extra_special_tokens")
        var named = [String: String]()
        for (name, fallback) in Tokenizer.defaultExtraSpecialTokens {
            named[name] = (try? extra?.string(name)) ?? fallback
        }
        self.extraSpecialTokens = named
        let required =
            [Tokenizer.imStart, Tokenizer.imEnd, Tokenizer.endOfText]
            + Tokenizer.defaultExtraSpecialTokens.map { named[$0.0]! }
        let missing = required.filter { tokenToId[$0] == nil }
        guard missing.isEmpty else {
            throw CoreError.invalid(
                "tokenizer.json: tokenizer lacks MiniCPM-V tokens \(missing.joined(separator: ", "))")
        }
        self.stopIds = try readStopIds(config: config, generationConfigJSON: generationConfigJSON)
    }

    private static func readNormalizer(_ n: JSONObject?) throws -> Bool {
        guard let n else { return false }
        switch try n.string("type") {
        case "NFC": return true
        case "Sequence":
            var any = false
            for (i, inner) in try n.objects("normalizers").enumerated() {
                guard try inner.string("type") == "NFC" else {
                    throw CoreError.invalid(
                        "tokenizer.json: normalizer \(i) \((try? inner.string("type")) ?? "?") is not supported (NFC only)"
                    )
                }
                any = true
            }
            return any
        case let other: throw CoreError.invalid("tokenizer.json: normalizer \(other) is not supported (NFC only)")
        }
    }

    private static func readPreTokenizer(_ p: JSONObject?) throws -> [PreStep] {
        guard let p else {
            throw CoreError.invalid("tokenizer.json: a byte-level tokenizer needs a pre_tokenizer")
        }
        switch try p.string("type") {
        case "Sequence":
            return try p.objects("pretokenizers").flatMap { try readPreTokenizer($0) }
        case "Split":
            let behavior = try p.string("behavior")
            guard behavior == "Isolated", (try? p.bool("invert")) != true else {
                throw CoreError.invalid("tokenizer.json: Split behavior \(behavior) is not supported (Isolated only)")
            }
            let pattern = try p.object("pattern")
            let source: String
            if pattern.has("Regex") {
                source = try pattern.string("Regex")
            } else {
                source = NSRegularExpression.escapedPattern(for: try pattern.string("String"))
            }
            return [.split(try compile(source))]
        case "ByteLevel":
            if (try? p.bool("add_prefix_space")) == true {
                throw CoreError.invalid("tokenizer.json: ByteLevel add_prefix_space is not supported")
            }
            let useRegex = (try? p.bool("use_regex")) ?? true
            return [.byteLevel(useRegex ? try compile(gpt2Pattern) : nil)]
        case let other:
            throw CoreError.invalid("tokenizer.json: pre_tokenizer \(other) is not supported")
        }
    }

    private static func compile(_ pattern: String) throws -> NSRegularExpression {
        do {
            return try NSRegularExpression(pattern: pattern, options: [])
        } catch {
            throw CoreError.invalid("tokenizer.json: pre-tokenizer regex does not compile: \(pattern)")
        }
    }

    private func readStopIds(config: JSONObject?, generationConfigJSON: String?) throws -> [Int] {
        if let text = generationConfigJSON {
            let gen = try JSONObject.parse(text, "generation_config.json")
            if gen.has("eos_token_id") {
                let v = try gen.value("eos_token_id")
                let ids = v is [Any] ? try gen.ints("eos_token_id") : [try gen.int("eos_token_id")]
                return Tokenizer.uniqueInOrder(ids)
            }
        }
        var names = [Tokenizer.imEnd, Tokenizer.endOfText]
        if let eos = config?.raw["eos_token"] {
            if let s = eos as? String {
                names.insert(s, at: 0)
            } else if let o = eos as? [String: Any], let s = o["content"] as? String {
                names.insert(s, at: 0)
            }
        }
        return Tokenizer.uniqueInOrder(names.compactMap { tokenToIdMap[$0] })
    }

    static func uniqueInOrder(_ ids: [Int]) -> [Int] {
        var seen = Set<Int>()
        return ids.filter { seen.insert($0).inserted }
    }

    // ---- lookups ---------------------------------------------------------------------------------

    /// The string of a named MiniCPM-V token (e.g. "image_token" -> "<|image_pad|>").
    public func named(_ name: String) throws -> String {
        guard let value = extraSpecialTokens[name] else {
            throw CoreError.invalid("unknown MiniCPM-V token name \(name)")
        }
        return value
    }

    public func tokenToId(_ token: String) -> Int? {
        tokenToIdMap[token]
    }

    public func isSpecial(_ id: Int) -> Bool {
        specialIds.contains(id)
    }

    /// Raw bytes of one token (empty for an unknown id).
    public func tokenBytes(_ id: Int) -> [UInt8] {
        idBytes[id] ?? []
    }

    /// Text of ids; broken UTF-8 becomes U+FFFD, as in transformers' decode.
    public func decode(_ ids: [Int], skipSpecialTokens: Bool = true) -> String {
        var bytes = [UInt8]()
        for id in ids where !(skipSpecialTokens && specialIds.contains(id)) {
            bytes += tokenBytes(id)
        }
        return Utf8StreamDecoder.decodeReplacing(bytes)
    }

    // ---- encoding --------------------------------------------------------------------------------

    /// Token ids, no BOS/EOS added; added tokens written in the text become their ids.
    public func encode(_ text: String) -> [Int] {
        var ids = [Int]()
        for segment in splitAdded(text) {
            switch segment {
            case .token(let id): ids.append(id)
            case .text(let s): encodeSegment(s, into: &ids)
            }
        }
        return ids
    }

    enum Segment {
        case token(Int)
        case text(String)
    }

    /// The text cut at added tokens, leftmost-longest; lstrip/rstrip tokens absorb the whitespace beside them.
    func splitAdded(_ text: String) -> [Segment] {
        let units = Array(text.utf16)
        var segments = [Segment]()
        var textStart = 0
        var i = 0
        func flushText(_ end: Int) {
            if end > textStart {
                segments.append(.text(String(decoding: units[textStart..<end], as: UTF16.self)))
            }
        }
        while i < units.count {
            var best: AddedToken?
            for t in added where t.utf16.count > (best?.utf16.count ?? 0) && i + t.utf16.count <= units.count {
                if units[i] == t.utf16[0] && Array(units[i..<(i + t.utf16.count)]) == t.utf16 {
                    best = t
                }
            }
            guard let token = best else {
                i += 1
                continue
            }
            var start = i
            if token.lstrip {
                while start > textStart && Tokenizer.isWhitespace(units[start - 1]) { start -= 1 }
            }
            flushText(start)
            segments.append(.token(token.id))
            i += token.utf16.count
            if token.rstrip {
                while i < units.count && Tokenizer.isWhitespace(units[i]) { i += 1 }
            }
            textStart = i
        }
        flushText(units.count)
        return segments
    }

    static func isWhitespace(_ u: UInt16) -> Bool {
        guard let s = Unicode.Scalar(u) else { return false }
        return s.properties.isWhitespace
    }

    private func encodeSegment(_ raw: String, into ids: inout [Int]) {
        let text = nfc ? raw.precomposedStringWithCanonicalMapping : raw
        var pieces = [text]
        for step in steps {
            switch step {
            case .split(let regex):
                pieces = pieces.flatMap { Tokenizer.isolatedSplit($0, regex) }
            case .byteLevel(let regex):
                if let regex {
                    pieces = pieces.flatMap { Tokenizer.isolatedSplit($0, regex) }
                }
            }
        }
        for piece in pieces where !piece.isEmpty {
            ids += bpe(Array(piece.utf8))
        }
    }

    /// Split keeping both the matches and the text between them, in order (behaviour "Isolated").
    static func isolatedSplit(_ text: String, _ regex: NSRegularExpression) -> [String] {
        let ns = text as NSString
        var out = [String]()
        var last = 0
        for m in regex.matches(in: text, options: [], range: NSRange(location: 0, length: ns.length))
        where m.range.length > 0 {
            if m.range.location > last {
                out.append(ns.substring(with: NSRange(location: last, length: m.range.location - last)))
            }
            out.append(ns.substring(with: m.range))
            last = m.range.location + m.range.length
        }
        if last < ns.length {
            out.append(ns.substring(from: last))
        }
        return out
    }

    /// Byte-pair merges of one pre-token, lowest rank first (leftmost among equal ranks).
    func bpe(_ bytes: [UInt8]) -> [Int] {
        lock.lock()
        if let hit = cache[bytes] {
            lock.unlock()
            return hit
        }
        lock.unlock()
        var symbols = bytes.map { singleByteIds[Int($0)] }
        if symbols.contains(-1) {
            // a byte with no token of its own: not a byte-level vocabulary; keep what can be kept
            symbols = symbols.filter { $0 >= 0 }
        }
        while symbols.count > 1 {
            var bestRank = Int.max
            var bestAt = -1
            var bestId = -1
            for k in 0..<(symbols.count - 1) {
                if let m = merges[Int64(symbols[k]) << 32 | Int64(symbols[k + 1])], m.rank < bestRank {
                    bestRank = m.rank
                    bestAt = k
                    bestId = m.id
                }
            }
            if bestAt < 0 {
                break
            }
            symbols[bestAt] = bestId
            symbols.remove(at: bestAt + 1)
        }
        lock.lock()
        if cache.count > 50_000 {
            cache.removeAll()
        }
        cache[bytes] = symbols
        lock.unlock()
        return symbols
    }

    /// Ids of the named tokens the prompt and the loop need.
    public func id(named name: String) throws -> Int {
        let token = try named(name)
        guard let id = tokenToIdMap[token] else {
            throw CoreError.invalid("tokenizer.json: no token \(token)")
        }
        return id
    }
}
