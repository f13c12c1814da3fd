import Foundation
import XCTest

@testable import MiniCPMVCore

/// The conformance kit (docs/conformance.md) named by $CONFORMANCE_KIT, read once per test process.
/// A missing or unreadable kit fails the tests that need it (it never skips them).
final class Kit: @unchecked Sendable {
    let root: URL
    let index: JSONObject

    nonisolated(unsafe) private static var cached: Result<Kit, Error>?
    private static let lock = NSLock()

    static func load() throws -> Kit {
        lock.lock()
        defer { lock.unlock() }
        if let cached { return try cached.get() }
        let result = Result { () throws -> Kit in
            guard let path = ProcessInfo.processInfo.environment["CONFORMANCE_KIT"], !path.isEmpty else {
                throw CoreError.invalid(
                    "CONFORMANCE_KIT is not set: write a kit with `minicpmv-edge conformance --out DIR` and point it there"
                )
            }
            return try Kit(root: URL(fileURLWithPath: path))
        }
        cached = result
        return try result.get()
    }

    init(root: URL) throws {
        self.root = root
        let data = try Data(contentsOf: root.appendingPathComponent("conformance.json"))
        index = try JSONObject.parse(data, "conformance.json")
        guard try index.string("schema") == "minicpmv-edge-conformance", try index.int("schema_version") == 1 else {
            throw CoreError.invalid("\(root.path) is not a version-1 conformance kit")
        }
    }

    func text(_ relative: String) throws -> String {
        try String(contentsOf: root.appendingPathComponent(relative), encoding: .utf8)
    }

    func asset(_ name: String) throws -> String? {
        let assets = try index.object("assets")
        guard assets.has(name) else { return nil }
        return try text(assets.string(name))
    }

    /// The kit's tokenizer (from its assets).
    lazy var tokenizer: Result<Tokenizer, Error> = Result {
        guard let json = try asset("tokenizer.json") else {
            throw CoreError.invalid("the kit has no tokenizer.json asset")
        }
        return try Tokenizer(
            tokenizerJSON: json, tokenizerConfigJSON: try asset("tokenizer_config.json"),
            generationConfigJSON: try asset("generation_config.json"))
    }

    var model: ModelInfo {
        get throws {
            let m = try index.object("model")
            return ModelInfo(
                family: try m.string("family"), hiddenSize: try m.int("hidden_size"),
                vocabSize: try m.int("vocab_size"),
                maxContext: try m.int("max_context"), chunkSize: try m.int("chunk_size"),
                patchSize: try m.int("patch_size"),
                imageTokenId: try m.int("image_token_id"), videoTokenId: try m.int("video_token_id"))
        }
    }

    var sliceConfig: SliceConfig {
        get throws {
            try SliceConfig(
                json: index.object("slice_config").raw,
                numPatchesPerSide: index.object("model").int("num_patches_per_side"))
        }
    }

    /// An array reference {file, dtype, shape, atol}.
    struct ArrayRef {
        let file: String
        let dtype: String
        let shape: [Int]
        let atol: Double
        var count: Int { shape.reduce(1, *) }
    }

    func ref(_ o: JSONObject, _ key: String) throws -> ArrayRef {
        let r = try o.object(key)
        return ArrayRef(
            file: try r.string("file"), dtype: try r.string("dtype"), shape: try r.ints("shape"),
            atol: try r.double("atol"))
    }

    private func bytes(_ ref: ArrayRef, itemSize: Int, dtype: String) throws -> Data {
        guard ref.dtype == dtype else {
            throw CoreError.invalid("\(ref.file): dtype \(ref.dtype), expected \(dtype)")
        }
        let data = try Data(contentsOf: root.appendingPathComponent(ref.file))
        guard data.count == ref.count * itemSize else {
            throw CoreError.invalid("\(ref.file): \(data.count) bytes for shape \(ref.shape) of \(dtype)")
        }
        return data
    }

    // Little-endian files on little-endian hosts (x86_64, arm64): the bytes are the values.
    func u8(_ ref: ArrayRef) throws -> [UInt8] {
        [UInt8](try bytes(ref, itemSize: 1, dtype: "uint8"))
    }

    func f32(_ ref: ArrayRef) throws -> [Float] {
        let data = try bytes(ref, itemSize: 4, dtype: "float32")
        return data.withUnsafeBytes { raw in
            (0..<ref.count).map { raw.loadUnaligned(fromByteOffset: $0 * 4, as: Float.self) }
        }
    }

    func f64(_ ref: ArrayRef) throws -> [Double] {
        let data = try bytes(ref, itemSize: 8, dtype: "float64")
        return data.withUnsafeBytes { raw in
            (0..<ref.count).map { raw.loadUnaligned(fromByteOffset: $0 * 8, as: Double.self) }
        }
    }

    func i64(_ ref: ArrayRef) throws -> [Int64] {
        let data = try bytes(ref, itemSize: 8, dtype: "int64")
        return data.withUnsafeBytes { raw in
            (0..<ref.count).map { raw.loadUnaligned(fromByteOffset: $0 * 8, as: Int64.self) }
        }
    }

    /// An image case's (or a generation image's) decoded pixels.
    func pixels(_ image: JSONObject) throws -> ImagePixels {
        let r = try ref(image, "pixels")
        return try ImagePixels(width: r.shape[1], height: r.shape[0], rgb: u8(r))
    }
}

/// Largest |a - b| (infinity when the lengths differ).
func maxAbsDiff(_ a: [Float], _ b: [Float]) -> Double {
    guard a.count == b.count else { return .infinity }
    var worst = 0.0
    for i in a.indices {
        let d = abs(Double(a[i]) - Double(b[i]))
        if d > worst || d.isNaN { worst = d.isNaN ? .infinity : d }
    }
    return worst
}

func maxAbsDiff(_ a: [Double], _ b: [Double]) -> Double {
    guard a.count == b.count else { return .infinity }
    var worst = 0.0
    for i in a.indices {
        let d = abs(a[i] - b[i])
        if d > worst || d.isNaN { worst = d.isNaN ? .infinity : d }
    }
    return worst
}
