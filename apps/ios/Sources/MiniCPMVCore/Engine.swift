/// The engine contract the host half drives: the three graphs of a bundle (vision encoder per
/// downsample mode, token embedding, text decoder at the prefill chunk and at one token). It mirrors
/// edge_runtime/backends/base.py, so the Python runtime and every app run the same loop. Arrays are
/// flat, row-major float32. The Core ML engine (Sources/MiniCPMVApp/CoreMLEngine.swift, Apple only)
/// and the tests' replay engine implement it.

/// What the host needs to know about the bundle's model (manifest.json `model` + limits).
public struct ModelInfo: Sendable, Equatable {
    public var family: String
    public var hiddenSize: Int
    public var vocabSize: Int
    public var maxContext: Int
    public var chunkSize: Int
    public var patchSize: Int
    public var imageTokenId: Int
    public var videoTokenId: Int

    public init(
        family: String, hiddenSize: Int, vocabSize: Int, maxContext: Int, chunkSize: Int, patchSize: Int,
        imageTokenId: Int, videoTokenId: Int
    ) {
        self.family = family
        self.hiddenSize = hiddenSize
        self.vocabSize = vocabSize
        self.maxContext = maxContext
        self.chunkSize = chunkSize
        self.patchSize = patchSize
        self.imageTokenId = imageTokenId
        self.videoTokenId = videoTokenId
    }
}

/// Opaque decoder state (KV caches and recurrent states). Engines update it in place, as Core ML
/// updates an MLState: one state object lives through every prefill chunk and decode step of a turn.
public protocol DecoderState: AnyObject {}

public protocol Engine: AnyObject {
    var info: ModelInfo { get }
    /// patches [L, 3*P*P] window-major, positionIds [L]; returns features [L / merge^2, hidden].
    func visionEncoder(patches: [Float], positionIds: [Int64], mode: DownsampleMode) async throws -> [Float]
    /// Embeddings of ids: [ids.count, hidden].
    func tokenEmbedding(_ ids: [Int]) async throws -> [Float]
    /// A zeroed state; allocation is load-time work, so it is outside TTFT.
    func newState() throws -> DecoderState
    /// embeds [chunkSize, hidden] (rows past nValid are zero padding) at positions startPos..;
    /// returns the last valid position's logits [V].
    func prefillChunk(embeds: [Float], nValid: Int, startPos: Int, state: DecoderState) async throws -> [Float]
    /// embed [1, hidden] at position pos; returns logits [V].
    func decodeStep(embed: [Float], pos: Int, state: DecoderState) async throws -> [Float]
}
