import Foundation

/// Typed reads from parsed JSON objects with one clear message naming the field.
/// (Values come from `JSONParser` below.)
public struct JSONObject {
    public let raw: [String: Any]
    /// Where the object lives, for messages ("manifest.json model").
    public let path: String

    public init(_ raw: [String: Any], _ path: String) {
        self.raw = raw
        self.path = path
    }

    /// Parses JSON text whose top level must be an object.
    public static func parse(_ data: Data, _ path: String) throws -> JSONObject {
        let value: Any
        do {
            value = try JSONParser.parse([UInt8](data))
        } catch {
            throw CoreError.invalid("\(path): not valid JSON (\(error))")
        }
        guard let object = value as? [String: Any] else {
            throw CoreError.invalid("\(path): not a JSON object")
        }
        return JSONObject(object, path)
    }

    public static func parse(_ text: String, _ path: String) throws -> JSONObject {
        try parse(Data(text.utf8), path)
    }

    func where_(_ key: String) -> String { "\(path).\(key)" }

    public func has(_ key: String) -> Bool {
        if let v = raw[key] { return !(v is NSNull) }
        return false
    }

    public func value(_ key: String) throws -> Any {
        guard let v = raw[key], !(v is NSNull) else {
            throw CoreError.invalid("\(where_(key)) is missing")
        }
        return v
    }

    public func object(_ key: String) throws -> JSONObject {
        guard let o = try value(key) as? [String: Any] else {
            throw CoreError.invalid("\(where_(key)) must be an object")
        }
        return JSONObject(o, where_(key))
    }

    public func optionalObject(_ key: String) throws -> JSONObject? {
        has(key) ? try object(key) : nil
    }

    public func array(_ key: String) throws -> [Any] {
        guard let a = try value(key) as? [Any] else {
            throw CoreError.invalid("\(where_(key)) must be an array")
        }
        return a
    }

    public func objects(_ key: String) throws -> [JSONObject] {
        try array(key).enumerated().map { i, v in
            guard let o = v as? [String: Any] else {
                throw CoreError.invalid("\(where_(key))[\(i)] must be an object")
            }
            return JSONObject(o, "\(where_(key))[\(i)]")
        }
    }

    public func string(_ key: String) throws -> String {
        guard let s = try value(key) as? String else {
            throw CoreError.invalid("\(where_(key)) must be a string")
        }
        return s
    }

    public func optionalString(_ key: String) throws -> String? {
        has(key) ? try string(key) : nil
    }

    public func strings(_ key: String) throws -> [String] {
        try array(key).map { v in
            guard let s = v as? String else { throw CoreError.invalid("\(where_(key)) must hold strings") }
            return s
        }
    }

    public func int(_ key: String) throws -> Int {
        try JSONObject.toInt(value(key), where_(key))
    }

    public func optionalInt(_ key: String) throws -> Int? {
        has(key) ? try int(key) : nil
    }

    public func ints(_ key: String) throws -> [Int] {
        try array(key).map { try JSONObject.toInt($0, where_(key)) }
    }

    public func double(_ key: String) throws -> Double {
        try JSONObject.toDouble(value(key), where_(key))
    }

    public func doubles(_ key: String) throws -> [Double] {
        try array(key).map { try JSONObject.toDouble($0, where_(key)) }
    }

    public func bool(_ key: String) throws -> Bool {
        guard let b = try value(key) as? Bool else {
            throw CoreError.invalid("\(where_(key)) must be true or false")
        }
        return b
    }

    public static func toInt(_ v: Any, _ path: String) throws -> Int {
        if let i = v as? Int {
            return i
        }
        if let d = v as? Double, d == d.rounded(), abs(d) < 9.0e15 {
            return Int(d)
        }
        throw CoreError.invalid("\(path) must be an integer, got \(v)")
    }

    public static func toDouble(_ v: Any, _ path: String) throws -> Double {
        if let d = v as? Double {
            return d
        }
        if let i = v as? Int {
            return Double(i)
        }
        throw CoreError.invalid("\(path) must be a number, got \(v)")
    }
}

/// A small JSON reader (RFC 8259) giving [String: Any], [Any], String, Int (integer literals that
/// fit), Double, Bool and NSNull. Ours rather than JSONSerialization because swift-corelibs-foundation's
/// JSONSerialization (Linux, where the tests run) rounds some decimal numbers to a neighbouring
/// double, and the kit's doubles are compared exactly; Swift's `Double(String)` is correctly rounded.
public enum JSONParser {
    public struct SyntaxError: Error, CustomStringConvertible {
        public let offset: Int
        public let message: String
        public var description: String { "\(message) at byte \(offset)" }
    }

    public static func parse(_ bytes: [UInt8]) throws -> Any {
        var p = Reader(bytes: bytes)
        p.skipSpace()
        let v = try p.value(depth: 0)
        p.skipSpace()
        guard p.at == bytes.count else { throw p.fail("trailing characters") }
        return v
    }

    struct Reader {
        let bytes: [UInt8]
        var at = 0

        func fail(_ message: String) -> SyntaxError { SyntaxError(offset: at, message: message) }

        mutating func skipSpace() {
            while at < bytes.count, [0x20, 0x0A, 0x0D, 0x09].contains(bytes[at]) { at += 1 }
        }

        mutating func expect(_ word: String) throws {
            let w = Array(word.utf8)
            guard at + w.count <= bytes.count, Array(bytes[at..<(at + w.count)]) == w else {
                throw fail("expected \(word)")
            }
            at += w.count
        }

        mutating func value(depth: Int) throws -> Any {
            guard depth < 512 else { throw fail("nesting too deep") }
            guard at < bytes.count else { throw fail("unexpected end") }
            switch bytes[at] {
            case UInt8(ascii: "{"):
                at += 1
                var out = [String: Any]()
                skipSpace()
                if at < bytes.count, bytes[at] == UInt8(ascii: "}") {
                    at += 1
                    return out
                }
                while true {
                    skipSpace()
                    guard at < bytes.count, bytes[at] == UInt8(ascii: "\"") else { throw fail("expected a key") }
                    let key = try string()
                    skipSpace()
                    try expect(":")
                    skipSpace()
                    out[key] = try value(depth: depth + 1)
                    skipSpace()
                    guard at < bytes.count else { throw fail("unexpected end") }
                    if bytes[at] == UInt8(ascii: ",") {
                        at += 1
                    } else if bytes[at] == UInt8(ascii: "}") {
                        at += 1
                        return out
                    } else {
                        throw fail("expected , or }")
                    }
                }
            case UInt8(ascii: "["):
                at += 1
                var out = [Any]()
                skipSpace()
                if at < bytes.count, bytes[at] == UInt8(ascii: "]") {
                    at += 1
                    return out
                }
                while true {
                    skipSpace()
                    out.append(try value(depth: depth + 1))
                    skipSpace()
                    guard at < bytes.count else { throw fail("unexpected end") }
                    if bytes[at] == UInt8(ascii: ",") {
                        at += 1
                    } else if bytes[at] == UInt8(ascii: "]") {
                        at += 1
                        return out
                    } else {
                        throw fail("expected , or ]")
                    }
                }
            case UInt8(ascii: "\""): return try string()
            case UInt8(ascii: "t"):
                try expect("true")
                return true
            case UInt8(ascii: "f"):
                try expect("false")
                return false
            case UInt8(ascii: "n"):
                try expect("null")
                return NSNull()
            default: return try number()
            }
        }

        mutating func number() throws -> Any {
            let start = at
            var integral = true
            if at < bytes.count, bytes[at] == UInt8(ascii: "-") { at += 1 }
            while at < bytes.count {
                let c = bytes[at]
                if c >= 0x30 && c <= 0x39 {
                    at += 1
                } else if c == UInt8(ascii: ".") || c == UInt8(ascii: "e") || c == UInt8(ascii: "E")
                    || c == UInt8(ascii: "+") || c == UInt8(ascii: "-")
                {
                    integral = false
                    at += 1
                } else {
                    break
                }
            }
            let text = String(decoding: bytes[start..<at], as: UTF8.self)
            if integral, let i = Int(text) {
                return i
            }
            guard !text.isEmpty, text != "-", let d = Double(text), d.isFinite else {
                throw SyntaxError(offset: start, message: "bad number \(text)")
            }
            return d
        }

        mutating func hex4() throws -> UInt32 {
            guard at + 4 <= bytes.count,
                let v = UInt32(String(decoding: bytes[at..<(at + 4)], as: UTF8.self), radix: 16)
            else { throw fail("bad \\u escape") }
            at += 4
            return v
        }

        mutating func string() throws -> String {
            at += 1  // the opening quote
            var out = [UInt8]()
            var runStart = at
            while true {
                guard at < bytes.count else { throw fail("unterminated string") }
                let c = bytes[at]
                if c == UInt8(ascii: "\"") {
                    out += bytes[runStart..<at]
                    at += 1
                    return String(decoding: out, as: UTF8.self)
                }
                if c < 0x20 { throw fail("control character in a string") }
                if c != UInt8(ascii: "\\") {
                    at += 1
                    continue
                }
                out += bytes[runStart..<at]
                at += 1
                guard at < bytes.count else { throw fail("unterminated escape") }
                let e = bytes[at]
                at += 1
                switch e {
                case UInt8(ascii: "\""): out.append(0x22)
                case UInt8(ascii: "\\"): out.append(0x5C)
                case UInt8(ascii: "/"): out.append(0x2F)
                case UInt8(ascii: "b"): out.append(0x08)
                case UInt8(ascii: "f"): out.append(0x0C)
                case UInt8(ascii: "n"): out.append(0x0A)
                case UInt8(ascii: "r"): out.append(0x0D)
                case UInt8(ascii: "t"): out.append(0x09)
                case UInt8(ascii: "u"):
                    var cp = try hex4()
                    if (0xD800...0xDBFF).contains(cp), at + 6 <= bytes.count, bytes[at] == UInt8(ascii: "\\"),
                        bytes[at + 1] == UInt8(ascii: "u")
                    {
                        let save = at
                        at += 2
                        let low = try hex4()
                        if (0xDC00...0xDFFF).contains(low) {
                            cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00)
                        } else {
                            at = save
                        }
                    }
                    let scalar = Unicode.Scalar(cp) ?? "\u{FFFD}"  // a lone surrogate, as Python's "replace"
                    out += Array(String(Character(scalar)).utf8)
                default: throw fail("bad escape")
                }
                runStart = at
            }
        }
    }
}
